"""Overload and disconnects on loopback, against one server with room for 4 running and 8 waiting
requests and a KV cache far smaller than the load (so preemption runs all the time).

Overload: a burst of streaming clients twelve times what ``max_num_seqs`` admits, each retrying a
429 a bounded number of times. Every request completes with the text of an offline run with a large
cache, or gets 429; none passes its deadline; afterwards nothing runs, no KV block is held, no
per-request state is left in the API process, and a second identical burst grows neither process's
memory beyond a small bound.

Disconnects: clients drop at random points (before the first token, mid-stream, while a long prompt
is prefilled, during a plain request; half with a reset, half with a clean close) next to streams
that must finish untouched. Afterwards the server is at rest and the dropped requests did not run
to their end."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from reliability_utils import Outcome, assert_at_rest, record, rss_mib, stream_completion
from server_utils import ServerProcess, metric
from tandem import LLM, SamplingParams

MAX_NUM_SEQS, MAX_NUM_WAITING = 4, 8
KV_TOKENS, MAX_MODEL_LEN = 160, 128
BURST = 12 * MAX_NUM_SEQS
RETRIES, RETRY_PAUSE_S, DEADLINE_S = 80, 0.25, 90


@pytest.fixture(scope="module")
def load_server():
    proc = ServerProcess("--model", "random:tiny", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-waiting",
                         str(MAX_NUM_WAITING), "--kv-cache-tokens", str(KV_TOKENS), "--block-size", "8",
                         "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "48")
    yield proc
    assert proc.stop() == 0, proc.log()


def _body(i: int) -> dict:
    return {"prompt": [(i * 13 + j) % 500 + 3 for j in range(8 + i % 24)], "max_tokens": 24 + i % 16,
            "ignore_eos": True, "temperature": 0.0 if i % 3 == 0 else 0.8, "seed": 1000 + i}


@pytest.fixture(scope="module")
def reference() -> list[str]:
    """The burst's texts from the offline engine with a KV cache that never runs short."""
    llm = LLM("random:tiny", device="cpu", kv_cache_tokens=16384, max_num_seqs=64)
    bodies = [_body(i) for i in range(BURST)]
    params = [SamplingParams(max_tokens=b["max_tokens"], ignore_eos=True, temperature=b["temperature"],
                             seed=b["seed"]) for b in bodies]
    outputs = llm.generate([b["prompt"] for b in bodies], params, use_tqdm=False)
    llm.engine.shutdown()
    return [o.outputs[0].text for o in outputs]


async def _client(http: httpx.AsyncClient, body: dict, refused: list[int]) -> Outcome:
    """One client: retries a 429 (after RETRY_PAUSE_S) up to RETRIES times."""
    for _ in range(RETRIES):
        outcome = await stream_completion(http, body, DEADLINE_S)
        if outcome.status != 429:
            return outcome
        refused.append(1)
        await asyncio.sleep(RETRY_PAUSE_S)
    return outcome


async def _burst(url: str) -> tuple[list[Outcome], int]:
    refused: list[int] = []
    limits = httpx.Limits(max_connections=BURST + 8)
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S, limits=limits) as http:
        outcomes = await asyncio.gather(*(_client(http, _body(i), refused) for i in range(BURST)))
    return list(outcomes), len(refused)


def _memory(server: ServerProcess) -> tuple[float, float]:
    return rss_mib(server.proc.pid), rss_mib(server.core_pid())


def test_an_overload_burst_completes_or_gets_429_and_leaves_nothing_behind(load_server, reference):
    preempted = metric(load_server.url, "tandem:num_preemptions_total")
    runs = []
    for _ in range(2):
        start = time.monotonic()
        outcomes, refused = asyncio.run(_burst(load_server.url))
        assert_at_rest(load_server.url)
        runs.append((outcomes, refused, time.monotonic() - start, _memory(load_server)))
    for outcomes, refused, _, _ in runs:
        for out, text in zip(outcomes, reference):
            assert out.status in (200, 429), out  # status 0 would be a hang past the deadline
            assert out.status == 429 or (out.completed and out.text == text), out
        assert refused > 0  # the burst did overload the server
    preemptions = metric(load_server.url, "tandem:num_preemptions_total") - preempted
    assert preemptions > 0  # the KV cache was exhausted again and again
    (api_1, core_1), (api_2, core_2) = runs[0][3], runs[1][3]
    assert api_2 - api_1 < 16 and core_2 - core_1 < 16, (runs[0][3], runs[1][3])
    completed = sum(o.completed for outcomes, *_ in runs for o in outcomes)
    record("overload", clients=BURST, bursts=2, max_num_seqs=MAX_NUM_SEQS, max_num_waiting=MAX_NUM_WAITING,
           completed=completed, refused_429=sum(r[1] for r in runs), hung=0, preemptions=preemptions,
           seconds=[round(r[2], 1) for r in runs], rss_mib_after_each_burst=[r[3] for r in runs])


# --- disconnects --------------------------------------------------------------------------------------
KINDS = ("before_first_token", "mid_stream", "during_long_prefill", "plain")
DROPS_PER_KIND = 15


def _request(body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)


async def _read_until(reader: asyncio.StreamReader, events: int) -> None:
    """Read the response head, then ``events`` SSE data lines."""
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    seen = 0
    while seen < events:
        line = await reader.readline()
        if not line:
            return
        seen += line.startswith(b"data: ")


async def _drop(port: int, kind: str, rng: random.Random) -> None:
    """A client that goes away at a point chosen by ``kind``; half reset the connection, half close it."""
    long_prompt = kind == "during_long_prefill"
    prompt = [rng.randrange(3, 500) for _ in range(MAX_MODEL_LEN - 8 if long_prompt else 6)]
    body = {"prompt": prompt, "max_tokens": 8 if long_prompt else 100, "ignore_eos": True, "stream": kind != "plain"}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(body))
    await writer.drain()
    if kind == "before_first_token" or long_prompt:
        await asyncio.sleep(rng.uniform(0, 0.01))  # the long prompt's prefill takes several steps
    elif kind == "mid_stream":
        await asyncio.wait_for(_read_until(reader, rng.randint(2, 12)), 30)
    else:
        await asyncio.sleep(rng.uniform(0.01, 0.3))
    if rng.random() < 0.5:
        writer.transport.abort()  # RST
    else:
        writer.close()
        await writer.wait_closed()


async def _survivor(url: str, body: dict) -> Outcome:
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as http:
        return await stream_completion(http, body, DEADLINE_S)


async def _disconnect_waves(url: str, port: int, rng: random.Random) -> list[Outcome]:
    survivors = [asyncio.ensure_future(_survivor(url, _body(i))) for i in range(3)]
    drops = [(kind, i) for kind in KINDS for i in range(DROPS_PER_KIND)]
    rng.shuffle(drops)
    for wave in range(0, len(drops), 6):  # at most 6 dropping clients at once: under max_num_waiting
        await asyncio.gather(*(_drop(port, kind, rng) for kind, _ in drops[wave:wave + 6]))
    return list(await asyncio.gather(*survivors))


def test_clients_dropping_at_random_points_leave_the_server_at_rest(load_server, reference):
    port = int(load_server.url.rsplit(":", 1)[1])
    generated = metric(load_server.url, "tandem:generation_tokens_total")
    survivors = asyncio.run(asyncio.wait_for(_disconnect_waves(load_server.url, port, random.Random(12)), 120))
    assert_at_rest(load_server.url)
    for out, text in zip(survivors, reference):
        assert out.completed and out.text == text  # the drops hurt no one else
    dropped_budget = DROPS_PER_KIND * (3 * 100 + 8)
    wasted = metric(load_server.url, "tandem:generation_tokens_total") - generated - sum(
        _body(i)["max_tokens"] for i in range(3))
    assert wasted < dropped_budget / 2  # the dropped requests were aborted, not run to their end
    record("disconnects", dropped=len(KINDS) * DROPS_PER_KIND, kinds=KINDS, per_kind=DROPS_PER_KIND,
           tokens_generated_for_dropped=wasted, budget_of_dropped=dropped_budget)
