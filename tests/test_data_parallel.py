"""Data parallelism on the CPU (issue 26, acceptance 2): ``tandem serve --data-parallel-size 2`` runs
two engine cores behind one API process. 200 concurrent requests (plain, streamed, n = 2, some
aborted) each complete once, both cores take a share; a shared-prefix workload lands on the core that
holds the prefix (the cores' own prefix-cache hit counters, read from /metrics); a core that dies
fails its requests with an error, and the server exits 1. ``--api-server-count 2``: two API
processes share the port and the cores. The routing policy alone: tests/test_dp_router.py."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import tempfile
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_utils import ServerProcess, pid_alive, wait_until

ARGS = ("--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "32", "--data-parallel-size", "2", "--metrics-prefix", "vllm")


@pytest.fixture(scope="module")
def dp_server():
    proc = ServerProcess(*ARGS)
    yield proc
    proc.stop()


def _per_engine(url: str, sample_name: str, **labels: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                found[s.labels["engine"]] = found.get(s.labels["engine"], 0.0) + s.value
    return found


def _idle(url: str) -> bool:
    """Nothing open in the API process, nothing running in either core (their idle reports are in)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return ("tandem:api_open_requests{model_name=\"random:tiny\"} 0.0" in text
            and sum(_per_engine(url, "vllm:num_requests_running").values()) == 0)


async def _complete(client: httpx.AsyncClient, body: dict) -> dict:
    resp = await client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _stream(client: httpx.AsyncClient, body: dict, stop_after: int | None = None) -> list[dict]:
    """The stream's chunks; with ``stop_after``, the client goes away after that many (an abort)."""
    chunks = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                if stop_after is not None and len(chunks) >= stop_after:
                    break
    return chunks


def test_200_concurrent_requests_complete_once_over_both_cores(dp_server):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(8, 40))] for _ in range(200)]
    before = _per_engine(dp_server.url, "vllm:request_success_total")

    async def run() -> list:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=dp_server.url, timeout=120, limits=limits) as client:
            jobs = []
            for i, prompt in enumerate(prompts):
                body = {"model": "random:tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
                if i % 10 == 0:
                    jobs.append(_stream(client, {**body, "max_tokens": 200}, stop_after=2))  # aborted
                elif i % 4 == 1:
                    jobs.append(_stream(client, body))
                elif i % 4 == 2:
                    jobs.append(_complete(client, {**body, "n": 2}))
                else:
                    jobs.append(_complete(client, body))
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    ids = set()
    finished = 0
    for i, result in enumerate(results):
        if i % 10 == 0:  # aborted after 2 chunks
            assert len(result) == 2
            continue
        if isinstance(result, list):  # a stream: 4 tokens, one finish
            ids.add(result[0]["id"])
            assert [c["choices"][0]["finish_reason"] for c in result if c["choices"]][-1] == "length"
            finished += 1
        else:
            ids.add(result["id"])
            assert [c["finish_reason"] for c in result["choices"]] == ["length"] * len(result["choices"])
            assert result["usage"]["completion_tokens"] == 4 * len(result["choices"])
            finished += len(result["choices"])
    assert len(ids) == 180  # every request answered once, under its own id
    assert wait_until(lambda: _idle(dp_server.url), 30)  # the aborted ones are gone from both cores
    after = _per_engine(dp_server.url, "vllm:request_success_total")
    per_core = {e: after.get(e, 0) - before.get(e, 0) for e in ("0", "1")}
    assert sum(per_core.values()) >= finished  # + the aborted ones, counted as "abort" where they ended
    assert min(per_core.values()) >= 40, per_core  # both cores took a share


def test_shared_prefixes_land_on_the_core_that_holds_them(dp_server):
    """8 groups of prompts sharing a 64-token prefix (4 blocks): a first request per group, then 3
    more per group at once. Routed by prefix, each finds its prefix cached: 64 of its 72 tokens hit
    (0.89). Routed by load alone (measured here: 0.59), many land on the core that never saw their
    prefix."""
    rng = random.Random(1)
    prefixes = [[rng.randrange(1, 500) for _ in range(64)] for _ in range(8)]

    def body(group: int) -> dict:
        prompt = prefixes[group] + [rng.randrange(1, 500) for _ in range(8)]
        return {"model": "random:tiny", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}

    async def wave(groups: list[int]) -> None:
        async with httpx.AsyncClient(base_url=dp_server.url, timeout=120) as client:
            await asyncio.gather(*[_complete(client, body(g)) for g in groups])

    asyncio.run(wave(list(range(8))))
    assert wait_until(lambda: _idle(dp_server.url), 30)
    queries = _per_engine(dp_server.url, "vllm:prefix_cache_queries_total")
    hits = _per_engine(dp_server.url, "vllm:prefix_cache_hits_total")
    asyncio.run(wave([g for _ in range(3) for g in range(8)]))
    assert wait_until(lambda: _idle(dp_server.url), 30)
    new_queries = {e: v - queries.get(e, 0) for e, v in _per_engine(
        dp_server.url, "vllm:prefix_cache_queries_total").items()}
    new_hits = {e: v - hits.get(e, 0) for e, v in _per_engine(dp_server.url, "vllm:prefix_cache_hits_total").items()}
    rate = sum(new_hits.values()) / sum(new_queries.values())
    assert rate >= 0.8, (new_hits, new_queries)  # 64 of each 72-token prompt: 0.89 at best
    assert min(new_queries.values()) > 0, new_queries  # both cores served groups


def _spawned(server: ServerProcess) -> tuple[list[int], list[int]]:
    """The first API process's spawned children: (engine cores, further API processes), told apart
    by whether they hold the listening socket."""
    port = int(server.url.rsplit(":", 1)[1])
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            listening.add(f"socket:[{fields[9]}]")
    cores, apis = [], []
    for pid in server.children():
        try:
            if b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # multiprocessing's resource tracker
            fds = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        (apis if fds & listening else cores).append(pid)
    return cores, apis


def test_a_dead_core_fails_its_requests_and_the_server_exits():
    """With two API processes: the one that started the cores sees the death through the process's
    sentinel, the other through a pidfd; streams on either end with the error."""
    server = ServerProcess(*ARGS, "--max-model-len", "2048", "--api-server-count", "2")  # the last one given wins
    try:
        pids, apis = _spawned(server)
        assert len(pids) == 2 and len(apis) == 1

        async def run() -> list:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                body = {"model": "random:tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True}
                streams = [asyncio.ensure_future(_stream(client, {**body, "prompt": [5 + i, 6, 7]}))
                           for i in range(8)]
                running = await asyncio.to_thread(
                    wait_until, lambda: min(_per_engine(server.url, "vllm:num_requests_running").values()) > 0, 20)
                assert running  # both cores run requests
                os.kill(pids[1], signal.SIGKILL)
                return await asyncio.gather(*streams)

        results = asyncio.run(run())
        for chunks in results:  # every stream ends with an error event, none hangs
            assert "engine core 1" in chunks[-1]["error"]["message"], chunks[-1]
        assert server.proc.wait(30) == 1
    finally:
        server.kill()


def test_each_core_gets_its_own_gpus_and_bad_counts_are_refused():
    from types import SimpleNamespace

    from tandem.server.dp_client import core_devices
    from tandem.server.options import ServeOptions

    cuda = SimpleNamespace(device="cuda", tensor_parallel_size=2)
    envs = core_devices(cuda, 2, {"CUDA_VISIBLE_DEVICES": "3,4,5,6,7"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,4", "5,6"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in core_devices(cuda, 2, {})] == ["0,1", "2,3"]
    cpu = core_devices(SimpleNamespace(device="cpu", tensor_parallel_size=1), 2, {})
    assert cpu == [{"TANDEM_DATA_PARALLEL_RANK": "0"}, {"TANDEM_DATA_PARALLEL_RANK": "1"}]  # its KV events' port
    assert envs[1]["TANDEM_DATA_PARALLEL_RANK"] == "1"
    assert core_devices(cuda, 1, {}) == [{}]
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        core_devices(cuda, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2"})
    with pytest.raises(ValueError, match="names one GPU"):
        core_devices(SimpleNamespace(device="cuda:1", tensor_parallel_size=1), 2, {})
    with pytest.raises(ValueError, match="--api-server-count must be >= 1"):
        ServeOptions(api_server_count=0)
    with pytest.raises(ValueError, match="--metrics-prefix"):
        ServeOptions(metrics_prefix="sglang")


def _shared_figures(server: ServerProcess) -> dict[str, dict]:
    """Each API process's own figures, from the files they pool /metrics through."""
    import msgspec

    found = {}
    for path in Path(tempfile.gettempdir()).glob(f"tandem-core-{server.proc.pid}-*/api-*.msgpack"):
        found[path.stem] = msgspec.msgpack.decode(path.read_bytes())
    return found


def _finished_per_process(server: ServerProcess) -> dict[str, float]:
    return {name: sum(e["success"].get("length", 0) for e in figures["engines"])
            for name, figures in _shared_figures(server).items()}


def test_two_api_processes_share_the_port_and_the_cores():
    """--api-server-count 2 with 2 cores: both API processes take connections (the kernel spreads
    them), every request completes once, /metrics answers the pooled totals whichever process
    answers the scrape, and SIGTERM stops everything with status 0."""
    server = ServerProcess(*ARGS, "--api-server-count", "2")
    try:
        rng = random.Random(2)

        async def run() -> list:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                bodies = [{"model": "random:tiny", "prompt": [rng.randrange(1, 500) for _ in range(12)],
                           "max_tokens": 4, "ignore_eos": True} for _ in range(100)]
                return await asyncio.gather(*[_stream(client, b) if i % 2 else _complete(client, b)
                                              for i, b in enumerate(bodies)])

        results = asyncio.run(run())
        ids = {r[0]["id"] if isinstance(r, list) else r["id"] for r in results}
        assert len(ids) == 100
        assert wait_until(lambda: sum(_finished_per_process(server).values()) == 100, 10)  # published each second
        per_process = _finished_per_process(server)
        assert len(per_process) == 2 and min(per_process.values()) > 0, per_process  # both answered requests
        for _ in range(4):  # whichever process answers, the same pooled totals
            totals = _per_engine(server.url, "vllm:request_success_total", finished_reason="length")
            assert sum(totals.values()) == 100, totals
        children = server.children()
        assert server.stop() == 0
        assert wait_until(lambda: not any(pid_alive(pid) for pid in children), 10)
    finally:
        server.kill()


def test_a_dead_api_process_takes_the_server_down():
    server = ServerProcess(*ARGS, "--api-server-count", "2")
    try:
        cores, apis = _spawned(server)
        assert len(cores) == 2 and len(apis) == 1
        os.kill(apis[0], signal.SIGKILL)
        assert server.proc.wait(30) == 1  # the other one fails what it serves and exits
        assert wait_until(lambda: not any(pid_alive(pid) for pid in cores), 10)
    finally:
        server.kill()


def test_the_cores_share_the_machines_grammar_workers(monkeypatch):
    """Unset, the default grammar workers (half the CPUs, at most 8) are divided among the cores;
    a count given on the command line is each core's."""
    from tandem.config import EngineConfig
    from tandem.server.dp_client import core_config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    default = EngineConfig.from_options("random:tiny")
    assert default.grammar_workers == 8
    assert core_config(default, 1) is default
    assert core_config(default, 2).grammar_workers == 4 and core_config(default, 16).grammar_workers == 0
    given = EngineConfig.from_options("random:tiny", structured_output_workers=3)
    assert core_config(given, 4).grammar_workers == 3
