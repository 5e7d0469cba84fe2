"""The watchdog judges the engine core by the stamps it writes into shared memory (heartbeat, loop
progress), not by when the API process last read from it (issue 21, points 3, 6 and 9):

- an API event loop blocked for longer than ``--core-timeout`` while requests wait does not get a
  healthy core killed: the requests complete and the server exits 0;
- a stopped core (SIGSTOP) turns ``/health`` to 503 within seconds; continued (SIGCONT) it serves on
  and ``/health`` is 200 again; left stopped past ``--core-timeout`` while a request waits, it is
  killed and the request ends with a 503 error event;
- a core killed under load: ``test_reliability_faults.py`` (503 for plain requests and streams).

The first tests judge ``CoreWatchdog`` alone, with stamps set by hand; the others run real servers."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from reliability_utils import Outcome, assert_at_rest, record, stream_completion
from server_utils import ServerProcess, metric, pid_alive, wait_until
from tandem.cli import main
from tandem.server.watchdog import CoreWatchdog

DEADLINE_S = 60
STALL_S = 4
HEARTBEAT_TIMEOUT_S = 1  # four of the core's heartbeats (every 0.25 s)
HEALTH_BOUND_S = 5  # /health must turn 503 this soon after SIGSTOP
# long enough that the first stop (until /health reads 503, then SIGCONT) is not taken for a hung core
CORE_TIMEOUT_S = 5


class _Stamps:
    """Stand-in for ``CoreStamps``: ages (seconds before now) instead of times; None for a core
    that keeps writing."""

    def __init__(self, heartbeat_age: float | None = None, progress_age: float | None = None) -> None:
        self.heartbeat_age, self.progress_age = heartbeat_age, progress_age

    @property
    def heartbeat(self) -> float:
        return time.monotonic() - (self.heartbeat_age or 0.0)

    @property
    def progress(self) -> float:
        return time.monotonic() - (self.progress_age or 0.0)


def _watchdog(stamps: _Stamps, waiting_for: float | None, stuck: list[float], core_timeout_s: float = 2.0,
              heartbeat_timeout_s: float = 5.0) -> CoreWatchdog:
    since = None if waiting_for is None else time.monotonic() - waiting_for
    watchdog = CoreWatchdog(stamps, core_timeout_s, heartbeat_timeout_s, lambda: since, stuck.append)
    watchdog.started -= 100  # judged as if the core had been ready for a while
    return watchdog


def test_silence_counts_from_the_later_of_the_core_progress_and_the_first_wait():
    assert _watchdog(_Stamps(progress_age=50), None, []).silent_for() == 0  # nothing waits: never stuck
    assert 9.9 < _watchdog(_Stamps(progress_age=10), 20, []).silent_for() < 11
    assert 2.9 < _watchdog(_Stamps(progress_age=10), 3, []).silent_for() < 4  # the core was idle before
    assert _watchdog(_Stamps(heartbeat_age=1), None, []).responsive()
    assert not _watchdog(_Stamps(heartbeat_age=6), None, []).responsive()
    assert _watchdog(_Stamps(heartbeat_age=600), None, [], heartbeat_timeout_s=0).responsive()  # 0: off


def test_a_blocked_event_loop_is_not_counted_against_a_core_that_kept_working():
    async def run(stamps: _Stamps) -> list[float]:
        stuck: list[float] = []
        watchdog = _watchdog(stamps, 0.0, stuck, core_timeout_s=0.2)
        watchdog.start()
        time.sleep(0.5)  # the event loop is blocked for longer than the timeout
        await asyncio.sleep(0.3)  # the watchdog looks (at least once)
        await watchdog.stop()
        return stuck

    assert asyncio.run(run(_Stamps())) == []  # the core's loop kept turning meanwhile
    stuck = asyncio.run(run(_Stamps(progress_age=1.0)))  # it did not
    assert len(stuck) == 1 and stuck[0] > 0.2


def test_the_heartbeat_timeout_is_checked(capsys):
    assert main(["serve", "--model", "random:tiny", "--core-heartbeat-timeout", "-1"]) == 2
    assert "--core-heartbeat-timeout" in capsys.readouterr().err


# --- real servers ---------------------------------------------------------------------------------
def _start(faults: str, *args: str) -> ServerProcess:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_FAULT_INJECT", faults)
        return ServerProcess("--model", "random:tiny", "--max-num-seqs", "2", "--max-model-len", "1100", *args)


def _body(i: int, max_tokens: int) -> dict:
    return {"prompt": [i % 50 + 3, 5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True, "seed": i}


async def _tokens_flow(url: str, beyond: float) -> None:
    while metric(url, "tandem:generation_tokens_total") < beyond + 10:
        await asyncio.sleep(0.05)


def test_a_blocked_event_loop_does_not_kill_a_healthy_core():
    """The 1st message to the core (the first request) and the 4th (a request sent while two streams
    run) each block the API process's event loop for 4 s, twice ``--core-timeout``."""
    server = _start(f"send@1:stall{STALL_S},send@4:stall{STALL_S}", "--core-timeout", "2")
    core = server.core_pid()

    async def run() -> tuple[httpx.Response, float, list[Outcome], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as http:
            start = time.monotonic()
            first = await http.post("/v1/completions", json=_body(0, 8))  # nothing else waits: a stall alone
            first_s = time.monotonic() - start
            streams = [asyncio.ensure_future(stream_completion(http, _body(i, 1000), DEADLINE_S)) for i in (1, 2)]
            await _tokens_flow(server.url, 8)
            last = await http.post("/v1/completions", json=_body(3, 8))  # stalls while the streams run
            return first, first_s, await asyncio.gather(*streams), last

    try:
        first, first_s, streams, last = asyncio.run(asyncio.wait_for(run(), DEADLINE_S))
        assert_at_rest(server.url)  # /health 200 too
        assert pid_alive(core) and server.core_pid() == core
        log = server.log()
    finally:
        code = server.stop()
    assert log.count("injecting a fault at send") == 2, log[-3000:]
    assert first_s >= STALL_S  # the request waited through the stall
    for resp in (first, last):
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8, resp.text
    assert all(out.completed and out.finish_reason == "length" for out in streams), streams
    assert "killing it" not in log and code == 0
    record("watchdog_loop_stall", stall_s=STALL_S, core_timeout_s=2, requests=4, completed=4)


async def _until_health(http: httpx.AsyncClient, status: int, timeout_s: float) -> tuple[float, str]:
    """Seconds until /health answers ``status`` (its body), polling every 0.1 s; inf if it never does."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        resp = await http.get("/health")
        if resp.status_code == status:
            return time.monotonic() - start, resp.text
        await asyncio.sleep(0.1)
    return float("inf"), ""


def test_a_stopped_core_reads_unhealthy_within_seconds_then_serves_on_or_is_killed_past_the_timeout():
    """SIGSTOP with a stream in flight: 503 within seconds; SIGCONT: 200, the stream completes.
    SIGSTOP again and leave it: past ``--core-timeout`` the core is killed, the stream gets a 503
    error event, the server exits 1."""
    server = _start("", "--core-heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--core-timeout", str(CORE_TIMEOUT_S))
    core = server.core_pid()

    async def stop_once(http: httpx.AsyncClient, i: int, resume: bool) -> tuple[float, str, float, Outcome]:
        stream = asyncio.ensure_future(stream_completion(http, _body(i, 1000), DEADLINE_S))
        await _tokens_flow(server.url, metric(server.url, "tandem:generation_tokens_total"))
        os.kill(core, signal.SIGSTOP)
        stopped = time.monotonic()
        noticed_s, body = await _until_health(http, 503, 3 * HEALTH_BOUND_S)
        back_s = float("inf")
        if resume:
            os.kill(core, signal.SIGCONT)
            back_s, _ = await _until_health(http, 200, 10)
        outcome = await stream
        return noticed_s, body, back_s if resume else time.monotonic() - stopped, outcome

    async def run() -> list[tuple[float, str, float, Outcome]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as http:
            return [await stop_once(http, 1, resume=True), await stop_once(http, 2, resume=False)]

    try:
        (noticed_s, body, back_s, resumed), (noticed2_s, _, ended_s, abandoned) = \
            asyncio.run(asyncio.wait_for(run(), 2 * DEADLINE_S))
        health = httpx.get(server.url + "/health", timeout=5)
        code = server.proc.wait(30)
    finally:
        if pid_alive(core):
            os.kill(core, signal.SIGCONT)
        server.kill()
    assert noticed_s <= HEALTH_BOUND_S and noticed2_s <= HEALTH_BOUND_S, (noticed_s, noticed2_s)
    assert "not responding" in body
    assert back_s < 5 and resumed.completed and resumed.finish_reason == "length", resumed
    # killed only once --core-timeout had passed without progress
    assert CORE_TIMEOUT_S - 1 <= ended_s < 30, ended_s
    assert abandoned.done and abandoned.error_type == "service_unavailable" and "stopped responding" in abandoned.error
    assert health.status_code == 503 and code == 1
    assert wait_until(lambda: not pid_alive(core), 5)
    record("watchdog_sigstop", heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
           noticed_s=[round(noticed_s, 2), round(noticed2_s, 2)], back_after_sigcont_s=round(back_s, 2),
           killed_after_s=round(ended_s, 2), core_timeout_s=CORE_TIMEOUT_S)
