"""``tandem bench-serve``: N concurrent streaming clients against a running server.

The workload is ``tandem bench``'s (the same random token-id prompts for the same seed, EOS ignored,
greedy unless a temperature is given), so the two compare at the same concurrency: with
``--num-requests`` equal to ``--num-clients`` (the default) every request is in flight at once, as in
the offline benchmark. Each client runs its requests one after another.

The client is a minimal HTTP/1.1 reader on asyncio streams rather than an HTTP library: at hundreds
of streams and tens of thousands of tokens per second, the client's own cost per event must not be
what is measured. TTFT is the time to the first streamed text; ITL is the time between streamed
chunks (a chunk may carry several tokens when the server coalesces); TPOT is (latency - TTFT) /
(tokens - 1) from the exact token count of the usage chunk. Before measuring, one request alone and
(unless ``warmup`` is off) one round of the workload with 16-token outputs run unmeasured: kernels
compile on their first use of a shape, which a long-running server pays once. Their prompts are
not the measured ones, so the run starts with none of its prompts in the prefix cache (as each
mode of ``tandem bench`` does). The server's GPU idle
fraction over the run comes from its cumulative device-time counters read before and after; the
recent-window gauge is also sampled every second while requests run, with the sequences the core runs
and queues (fewer running than clients means the requests reach it late)."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from tandem.bench.report import provenance

_decode = msgspec.json.decode


@dataclass
class BenchServeConfig:
    url: str = "http://127.0.0.1:8000"
    num_clients: int = 8
    num_requests: int | None = None  # default: one per client
    prompt_len: int = 256
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    model: str | None = None  # default: the server's first model
    api_key: str | None = None
    warmup: bool = True  # one round of the workload with 16-token outputs first (kernels compile on first use)


@dataclass
class RequestResult:
    ttft: float | None = None
    latency: float = 0.0
    chunk_gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


class _Endpoint:
    def __init__(self, url: str, api_key: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url must be http://host[:port], got {url!r}")
        self.base = f"http://{parts.hostname}:{parts.port or 80}"
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(urllib.request.Request(self.base + path, headers=self.headers), timeout=30) as r:
            return json.loads(r.read())

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return r.read().decode()


async def _open_stream(ep: _Endpoint, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    head = ["POST /v1/completions HTTP/1.1", f"Host: {ep.host}:{ep.port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in ep.headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass  # headers: uvicorn streams with chunked transfer encoding, which _events reads
    return reader, writer, status


async def _events(reader: asyncio.StreamReader):
    """The ``data:`` payloads of a chunked SSE body, with their arrival times."""
    buffer = b""
    while True:
        size = int((await reader.readline()).split(b";")[0] or b"0", 16)
        if size == 0:
            return
        buffer += (await reader.readexactly(size + 2))[:-2]
        now = time.perf_counter()
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: "):
                yield event[6:], now


async def _one_request(ep: _Endpoint, payload: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        reader, writer, status = await _open_stream(ep, msgspec.json.encode(payload))
    except (OSError, IndexError, ValueError) as exc:  # refused, reset, or not HTTP
        result.error = f"connection failed: {exc}"
        return result
    try:
        if status != 200:
            result.error = f"HTTP {status}: {(await reader.read())[-300:].decode(errors='replace')}"
            return result
        async for data, now in _events(reader):
            if data == b"[DONE]":
                break
            event = _decode(data)
            if "error" in event:
                result.error = event["error"].get("message", "error")
            elif event.get("usage"):
                result.output_tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.chunk_gaps.append(now - last)
                last = now
    finally:
        writer.close()
    result.latency = time.perf_counter() - start
    return result


# sampled every second while requests run: the GPU's recent idle fraction, and how many sequences the
# core runs and queues (fewer running than clients: the requests reach it late, e.g. an API process behind)
SAMPLED = {"idle": "tandem:gpu_idle_fraction", "running": "tandem:num_requests_running",
           "waiting": "tandem:num_requests_waiting"}


async def _sample_server(ep: _Endpoint, samples: dict[str, list[float]], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
            return  # the requests are done: a sample now would count the idle server after them
        except asyncio.TimeoutError:
            pass
        text = await loop.run_in_executor(None, ep.get_text, "/metrics")
        for key, name in SAMPLED.items():
            value = _metric(text, name)
            if value is not None and value == value:  # idle is NaN before two steps ran
                samples[key].append(value)


def _device_seconds(ep: _Endpoint, text: str | None = None) -> tuple[float, float] | None:
    """The server's cumulative (busy, idle) device seconds; None from a server without them."""
    text = ep.get_text("/metrics") if text is None else text
    busy, idle = _metric(text, "tandem:gpu_busy_seconds_total"), _metric(text, "tandem:gpu_idle_seconds_total")
    return None if busy is None or idle is None else (busy, idle)


def _idle_between(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """The idle fraction over a window, from the counters at its ends."""
    if before is None or after is None:
        return None
    busy, idle = after[0] - before[0], after[1] - before[1]
    return idle / (busy + idle) if busy + idle > 0 else None


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _prompts(cfg: BenchServeConfig, num_requests: int, vocab_size: int) -> list[list[int]]:
    """The offline benchmark's fixed-length prompts for the same seed: one draw of
    [num_requests, prompt_len] token ids from a torch generator seeded with ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab_size, (num_requests, cfg.prompt_len), generator=gen).tolist()


async def _run(cfg: BenchServeConfig, ep: _Endpoint, model: str, prompts: list[list[int]]
               ) -> tuple[list[RequestResult], float, dict[str, list[float]]]:
    queue = list(enumerate(prompts))[::-1]
    results: list[RequestResult | None] = [None] * len(prompts)

    async def client() -> None:
        while queue:
            index, prompt = queue.pop()
            payload = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "ignore_eos": True,
                       "temperature": cfg.temperature, "stream": True, "stream_options": {"include_usage": True}}
            if cfg.temperature > 0:
                payload["seed"] = cfg.seed + index
            results[index] = await _one_request(ep, payload)

    sampled: dict[str, list[float]] = {key: [] for key in SAMPLED}
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(_sample_server(ep, sampled, stop))
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(cfg.num_clients)))
    wall = time.perf_counter() - start
    stop.set()
    await sampler
    return results, wall, sampled  # type: ignore[return-value]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(values) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def summarise(cfg: BenchServeConfig, results: list[RequestResult], wall: float, sampled: dict[str, list[float]],
              final_idle: float | None) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    idle = sampled.get("idle", [])
    return {
        "config": asdict(cfg), "num_requests": len(results), "num_errors": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5], "wall_s": wall,
        "output_tokens": tokens, "output_tok_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft": _percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl": _percentiles([g for r in ok for g in r.chunk_gaps]), "tpot": _percentiles(tpot),
        "gpu_idle_fraction": {"mean": float(np.mean(idle)) if idle else None, "max": max(idle) if idle else None,
                              "samples": len(idle), "at_end": final_idle},
        "server_sequences": {key: {"mean": float(np.mean(sampled[key])), "min": min(sampled[key])}
                             for key in ("running", "waiting") if sampled.get(key)},
    }


def bench_serve(cfg: BenchServeConfig, json_path: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    if cfg.num_clients < 1 or cfg.prompt_len < 1 or cfg.max_tokens < 1:
        raise ValueError("--num-clients, --prompt-len and --max-tokens must be >= 1")
    ep = _Endpoint(cfg.url, cfg.api_key)
    try:
        models = ep.get_json("/v1/models")["data"]
    except urllib.error.HTTPError as exc:
        raise ValueError(f"the server at {cfg.url} refused: HTTP {exc.code} {exc.read()[:300]!r}") from exc
    except OSError as exc:
        raise ValueError(f"cannot reach a tandem server at {cfg.url}: {exc}") from exc
    entry = next((m for m in models if m["id"] == cfg.model), None) if cfg.model else models[0]
    if entry is None:
        raise ValueError(f"the server does not serve {cfg.model!r}; it serves {[m['id'] for m in models]}")
    num_requests = cfg.num_requests or cfg.num_clients
    vocab = int(entry.get("vocab_size") or 256)
    prompts = _prompts(cfg, num_requests, vocab)
    asyncio.run(_run(cfg, ep, entry["id"], [[1] * cfg.prompt_len]))  # warm-up: one request alone
    if cfg.warmup:  # the same shapes once, so first-use kernel compilation is not measured; other
        # prompts (the next seed's), or the run would find its prompts in the prefix cache
        warm = replace(cfg, max_tokens=min(cfg.max_tokens, 16), seed=cfg.seed + 1)
        asyncio.run(_run(warm, ep, entry["id"], _prompts(warm, num_requests, vocab)))
    before = _device_seconds(ep)
    results, wall, sampled = asyncio.run(_run(cfg, ep, entry["id"], prompts))
    metrics = ep.get_text("/metrics")
    report = summarise(cfg, results, wall, sampled, _metric(metrics, "tandem:gpu_idle_fraction"))
    report["gpu_idle_fraction"]["run"] = _idle_between(before, _device_seconds(ep, metrics))
    report["model"] = entry["id"]
    report.update(provenance())
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        print(format_report(report))
    return report


def _sequences_line(r: dict[str, Any]) -> list[str]:
    seqs = r.get("server_sequences") or {}
    if "running" not in seqs:
        return []
    waiting = seqs.get("waiting", {"mean": 0.0})
    return [f"  server sequences (sampled each second): running mean {seqs['running']['mean']:.1f}, min "
            f"{seqs['running']['min']:.0f} (clients {r['config']['num_clients']}); waiting mean {waiting['mean']:.1f}"]


def format_report(r: dict[str, Any]) -> str:
    c = r["config"]
    ms = lambda d: "n/a" if d["p50_ms"] is None else f"p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms"  # noqa: E731
    idle = r["gpu_idle_fraction"]
    idle_text = "n/a" if idle["mean"] is None else f"mean {idle['mean']:.2%}, max {idle['max']:.2%} " \
                                                   f"({idle['samples']} samples, last 256 steps each)"
    if idle.get("run") is not None:
        idle_text = f"{idle['run']:.2%} over the run; samples {idle_text}"
    return "\n".join([
        f"bench-serve: {r['model']} at {c['url']}: {c['num_clients']} clients, {r['num_requests']} requests x "
        f"({c['prompt_len']} prompt + {c['max_tokens']} new tokens)",
        f"  wall {r['wall_s']:.2f} s, {r['output_tokens']} output tokens: {r['output_tok_per_s']:.1f} output tok/s",
        f"  TTFT {ms(r['ttft'])}",
        f"  ITL  {ms(r['itl'])} (between streamed chunks); TPOT {ms(r['tpot'])}",
        f"  server GPU idle fraction: {idle_text}",
        *_sequences_line(r),
        f"  errors: {r['num_errors']}" + (f" ({'; '.join(r['errors'])})" if r["errors"] else ""),
    ])
