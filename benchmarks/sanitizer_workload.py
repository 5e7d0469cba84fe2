"""A long-ish asynchronous engine run that exercises everything a device-side race or overrun could
hide in, meant to run under compute-sanitizer (``scripts/sanitizer_run.sh``): CUDA graphs on
(decode graphs and piecewise prefill graphs), chunked prefills mixed with decodes in one step,
requests arriving mid-run, aborts at random steps, preemption from a small KV cache, and prefix
caching when this tree's EngineConfig has ``enable_prefix_caching``.

Usage: python3 scripts/sanitizer_workload.py [--requests 24] [--budget-s 120] [--device cuda|cpu]
       [--model random:tiny] [--quantization int4|fp8] [--kv-cache-dtype fp8]

``--model``, ``--quantization`` and ``--kv-cache-dtype`` put the other kernels under the tool: the
W4A16 and FP8 GEMMs, the fused MoE kernel (with FP8 experts), Gemma's fused norms, the FP8 KV cache.
The tiny presets share random:tiny's 512-token vocabulary, which the prompts assume.

The sanitizer slows every kernel 10-100x, so the run is bounded by time as well as by count: after
``--budget-s`` seconds no new request starts, and a quarter of that later (at least 15 s) what still
runs is aborted. Prints one summary line; exits 1 if any started request failed to end."""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.config import EngineConfig  # noqa: E402
from tandem.llm import create_engine  # noqa: E402
from tandem.sampling_params import SamplingParams  # noqa: E402

VOCAB = 512  # random:tiny
SHARED_PREFIX = [(7 * i) % VOCAB for i in range(48)]  # three 16-token blocks, for prefix caching


@dataclasses.dataclass
class Planned:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int  # loop step at which it is added
    abort_after: int | None  # steps after arriving; None: runs to its end


class StepKinds:
    """A StepObserver counting steps that mix prefill chunks with decodes (what piecewise graphs and
    the varlen kernel run) and pure decode steps (what decode graphs replay)."""

    def __init__(self) -> None:
        self.mixed = self.decode = self.prefill = 0

    def step_submitted(self, sched, times) -> None:
        decodes = sum(item.start >= item.seq.prompt_len for item in sched.items)
        if decodes == len(sched.items):
            self.decode += 1
        elif decodes:
            self.mixed += 1
        else:
            self.prefill += 1

    def step_processed(self, step_id, times) -> None:
        pass


def prefix_caching_available() -> bool:
    return "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}


def plan(num_requests: int, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    planned = []
    for i in range(num_requests):
        body = [rng.randrange(VOCAB) for _ in range(rng.choice([3, 20, 70, 150]))]
        prompt = SHARED_PREFIX + body if i % 2 else body
        greedy = rng.random() < 0.5
        params = SamplingParams(max_tokens=rng.randint(8, 48), ignore_eos=True, temperature=0.0 if greedy else 0.9,
                                top_p=1.0 if greedy else 0.9, seed=rng.randrange(2**31))
        abort_after = rng.randint(1, 30) if rng.random() < 0.2 else None
        planned.append(Planned(f"r{i}", prompt, params, rng.randint(0, 4 * i), abort_after))
    return planned


def engine_config(args: argparse.Namespace) -> EngineConfig:
    options = dict(model=args.model, device=args.device, quantization=args.quantization,
                   kv_cache_dtype=args.kv_cache_dtype, async_batching=True, enforce_eager=False, max_num_seqs=8,
                   max_num_batched_tokens=64, kv_cache_tokens=512, block_size=16, max_model_len=256)
    if prefix_caching_available():
        options["enable_prefix_caching"] = True
    return EngineConfig(**options)


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    engine = create_engine(engine_config(args))
    kinds = StepKinds()
    engine.core.observers.append(kinds)
    print(f"[{time.monotonic() - start:.0f} s] engine ready on {engine.worker.info.device_name}: decode graphs "
          f"{engine.worker.info.graph_batch_sizes}, piecewise {engine.worker.info.graph_token_buckets}", flush=True)
    pending = sorted(plan(args.requests, args.seed), key=lambda p: p.arrive)
    started: dict[str, Planned] = {}
    ended: set[str] = set()
    aborted = skipped = cut = step = 0
    hard_stop = args.budget_s + max(15.0, args.budget_s / 4)
    while pending or engine.has_unfinished_requests():
        elapsed = time.monotonic() - start
        if pending and elapsed > args.budget_s:
            skipped, pending = len(pending), []  # out of time: let what runs finish
        if elapsed > hard_stop:  # still running: abort, so the stage ends inside its limit
            cut += _abort_all(engine, started, ended)
        while pending and pending[0].arrive <= step:
            p = pending.pop(0)
            engine.add_request(p.rid, None, p.params, prompt_token_ids=p.prompt)
            started[p.rid] = p
        for rid, p in started.items():
            if rid not in ended and p.abort_after is not None and step == p.arrive + p.abort_after:
                if engine.abort_request(rid) is not None:
                    ended.add(rid)
                    aborted += 1
        ended.update(out.request_id for out in engine.step() if out.finished)
        step += 1
        if step % 200 == 0:
            print(f"[{time.monotonic() - start:.0f} s] step {step}: {len(ended)}/{len(started)} ended", flush=True)
        if step > 100_000:
            break
    preemptions = engine.core.scheduler.num_preemptions
    engine.shutdown()
    lost = sorted(set(started) - ended)
    finished = len(started) - aborted - cut - len(lost)
    print(f"workload: {len(started)} requests ({finished} finished, {aborted} aborted, {skipped} not started and "
          f"{cut} cut short: time budget), {step} steps ({kinds.mixed} mixed prefill+decode, {kinds.decode} "
          f"decode, {kinds.prefill} prefill), {preemptions} preemptions, prefix caching "
          f"{'on' if prefix_caching_available() else 'not in this tree'}, {time.monotonic() - start:.0f} s; "
          f"{'every request ended' if not lost else f'NOT ENDED: {lost}'}", flush=True)
    return 1 if lost else 0


def _abort_all(engine, started: dict[str, Planned], ended: set[str]) -> int:
    cut = [rid for rid in started if rid not in ended and engine.abort_request(rid) is not None]
    ended.update(cut)
    return len(cut)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--budget-s", type=float, default=120.0, help="no new request starts after this")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="random:tiny", help="a tiny preset (a 512-token vocabulary)")
    parser.add_argument("--quantization", default="auto", help="int4 or fp8: quantize the weights at load")
    parser.add_argument("--kv-cache-dtype", default="auto")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
