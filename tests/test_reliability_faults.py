"""Faults inside the engine, through a real server: exceptions injected (``TANDEM_FAULT_INJECT``, the
test-only hook) in planning, on the device and in output handling, in the core and in the API
process; a core whose steps keep failing; a core that hangs; a core killed outright under load.

Each affected request ends with a clear error event and ``[DONE]``, never a hang. A fault in one
step is recovered from: the other requests finish with exactly the text a fault-free run gives, the
server stays healthy and ends at rest. A core that cannot go on is declared dead: every request
ends with an error (503 once the core is gone), ``/health`` answers 503 and the server exits 1."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from reliability_utils import Outcome, assert_at_rest, record, stream_completion
from server_utils import ServerProcess, metric, pid_alive, wait_until

DEADLINE_S = 60
RECOVERABLE = "schedule@10,device@60,update@110,output@40"


def _start(faults: str, *args: str) -> ServerProcess:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANDEM_FAULT_INJECT", faults)
        return ServerProcess("--model", "random:tiny", "--max-num-seqs", "2", "--max-model-len", "256", *args)


def _bodies(count: int, max_tokens: int = 24) -> list[dict]:
    return [{"prompt": [i % 50 + 3, 5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8,
             "seed": 100 + i} for i in range(count)]


async def _burst(url: str, bodies: list[dict]) -> list[Outcome]:
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as http:
        return await asyncio.gather(*(stream_completion(http, b, DEADLINE_S) for b in bodies))


def _assert_all_ended(outcomes: list[Outcome]) -> None:
    """Every request completed or failed with an error event; none hung, none ended silently."""
    for out in outcomes:
        assert out.status != 0, "a request hung"
        assert out.completed or (out.error and (out.done or out.status >= 400)), out


def test_faults_in_one_step_end_its_requests_and_the_server_serves_on():
    server = _start(RECOVERABLE)
    try:
        rounds = [asyncio.run(_burst(server.url, _bodies(6))) for _ in range(4)]
        clean = asyncio.run(_burst(server.url, _bodies(6)))  # every fault has fired by now
        assert_at_rest(server.url)
        log = server.log()
    finally:
        code = server.stop()
    for site in ("schedule", "device", "update", "output"):
        assert f"injecting a fault at {site}" in log, log[-3000:]
    assert all(out.completed for out in clean)
    failed = 0
    for outcomes in rounds:
        _assert_all_ended(outcomes)
        for out, reference in zip(outcomes, clean):
            if out.completed:
                assert out.text == reference.text  # unaffected requests: the fault-free tokens
            else:
                failed += 1
                assert "InjectedFault" in out.error and "server" in out.error
    assert failed >= 4 and code == 0  # each fault failed at least its step's request
    record("server_faults_recovered", faults=4, requests=24, failed=failed, completed=24 - failed)


def _assert_declared_dead(server: ServerProcess, outcomes: list[Outcome], words: str) -> None:
    _assert_all_ended(outcomes)
    assert all(not out.completed for out in outcomes[-2:])  # the last ones cannot have completed
    assert any(words in (out.error or "") for out in outcomes), [out.error for out in outcomes]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 503
    refused = httpx.post(server.url + "/v1/completions", json=_bodies(1)[0], timeout=5)
    assert refused.status_code == 503
    assert server.proc.wait(30) == 1


def test_a_core_whose_steps_keep_failing_is_declared_dead():
    server = _start("device@3+")
    try:
        outcomes = asyncio.run(_burst(server.url, _bodies(6)))
        _assert_declared_dead(server, outcomes, "no progress")
    finally:
        server.kill()
    record("server_fault_fatal", requests=6, failed=sum(not o.completed for o in outcomes))


def test_a_hung_core_is_declared_dead_by_the_watchdog():
    server = _start("schedule@5:hang", "--core-timeout", "2")
    core = server.core_pid()
    try:
        start = time.monotonic()
        outcomes = asyncio.run(_burst(server.url, _bodies(4)))
        assert time.monotonic() - start < 15
        _assert_declared_dead(server, outcomes, "stopped responding")
        assert all(out.error_type == "service_unavailable" for out in outcomes)  # 503: the core is gone
        assert wait_until(lambda: not pid_alive(core), 5)
    finally:
        server.kill()
    record("server_core_hang", requests=4, failed=sum(not o.completed for o in outcomes))


def test_a_core_killed_under_load_fails_every_request_and_the_server_exits_1():
    server = _start("")
    try:
        async def run() -> tuple[list[Outcome], list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as http:
                streams = [asyncio.ensure_future(stream_completion(http, b, DEADLINE_S)) for b in _bodies(8, 200)]
                plain = [asyncio.ensure_future(http.post("/v1/completions", json=b)) for b in _bodies(4, 200)]
                while not any(s.done() for s in streams) and metric(server.url, "tandem:generation_tokens_total") < 20:
                    await asyncio.sleep(0.05)  # until tokens flow
                os.kill(server.core_pid(), signal.SIGKILL)
                return await asyncio.gather(*streams), await asyncio.gather(*plain)

        outcomes, plain = asyncio.run(asyncio.wait_for(run(), DEADLINE_S))
        _assert_declared_dead(server, outcomes, "engine core process died")
        for out in outcomes:  # streams: an error event of a 503, then [DONE]
            assert out.completed or out.done and out.error_type == "service_unavailable", out
        for resp in plain:  # a plain request that finished before the kill has its full output
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 200 \
                or resp.status_code == 503 and "engine core" in resp.json()["error"]["message"], resp.text
        assert any(resp.status_code == 503 for resp in plain)  # queued behind 8 streams: in flight at the kill
    finally:
        server.kill()
    failed = sum(not o.completed for o in outcomes) + sum(r.status_code != 200 for r in plain)
    record("server_core_killed", requests=12, failed=failed)
