"""Data parallelism on the CPU (issue 26, acceptance 2): ``tandem serve --data-parallel-size 2`` runs
two engine cores behind one API process. 200 concurrent requests (plain, streamed, n = 2, some
aborted) each complete once, both cores take a share; a shared-prefix workload lands on the core that
holds the prefix (the cores' own prefix-cache hit counters, read from /metrics); a core that dies
fails its requests with an error, and the server exits 1. The routing policy alone:
tests/test_dp_router.py."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_utils import ServerProcess, wait_until

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


def _core_pids(server: ServerProcess) -> list[int]:
    pids = []
    for pid in server.children():
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def test_a_dead_core_fails_its_requests_and_the_server_exits():
    server = ServerProcess(*ARGS, "--max-model-len", "2048")  # the last one given wins
    try:
        pids = _core_pids(server)
        assert len(pids) == 2

        async def run() -> list:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                body = {"model": "random:tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True}
                streams = [asyncio.ensure_future(_stream(client, {**body, "prompt": [5 + i, 6, 7]}))
                           for i in range(4)]
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


def test_each_core_gets_its_own_gpus_and_what_is_not_built_is_refused():
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
    with pytest.raises(ValueError, match="--api-server-count > 1 is not built"):
        ServeOptions(api_server_count=2)
    with pytest.raises(ValueError, match="--metrics-prefix"):
        ServeOptions(metrics_prefix="sglang")
