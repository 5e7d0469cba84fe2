"""Tensor-parallel checks and benchmarks on one machine with >= 2 GPUs, in one call of under 10 minutes
(2 x H200). From the repository root:

    python scripts/tp_gpu_checks.py OUT_DIR [--tp 2] [--budget-s 560]

Steps, each in its own process with a timeout (their whole output goes to OUT_DIR/log.txt):
  allreduce  the collectives of one decode step (2 per layer + the embedding's all-reduce + the logits'
             all-gather, 32 rows), NCCL, captured in a CUDA graph: per-step cost at 8B and 70B shapes
  smoke      tiny checkpoints (llama; qwen3 with its one KV head replicated): tp=N tokens == tp=1, fp32,
             CUDA graphs on, greedy + seeded, sync and async, chunked prefill + preemption, two requests
             under grammars (their steps wait for rank 0's mask)
  S70b       tandem bench random:llama3-70b, workload S (32 x (256 + 1024)), tp=N, sync + async, with
             --json and --timeline (141 GB of bf16 weights: each GPU draws only its shards)
  fp32       random:llama3-8b, 8 prompts x 32 new tokens, greedy, float32: tp=N tokens == tp=1 (a
             mismatch is reported with tp=1's top-2 logit gap where the sequences part)
  S_tp1/S_tpN  tandem bench random:llama3-8b, workload S, bf16, async, at tp=1 and tp=N
A summary table is printed last. Files (6): log.txt, summary.json, S70b_tpN.json, S70b_tpN_timeline.png,
S_tp1.json, S_tpN.json. Every rank runs with NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
S_ARGS = ["--num-requests", "32", "--prompt-len", "256", "--max-tokens", "1024", "--max-num-seqs", "32", "--no-progress"]
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "TANDEM_TP_LOG_LEVEL": "INFO",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)}


# --- in-process checks (run as this script's sub-commands) ----------------------------------------
def allreduce_bench(out: Path) -> None:
    """Under torchrun: one decode step's collectives, captured in a graph, replayed and timed."""
    import torch
    import torch.distributed as dist

    from tandem.bench.roofline import _time_ms
    from tandem.model.tp_ops import all_gather_rows
    from tandem.parallel.env import rank_env
    from tandem.parallel.group import join

    group = join(rank_env())
    results = {}
    for name, hidden, layers in (("llama3-8b", 4096, 32), ("llama3-70b", 8192, 80)):
        x = torch.zeros(32, hidden, dtype=torch.bfloat16, device="cuda")
        logits = torch.zeros(32, -(-128256 // group.size), dtype=torch.bfloat16, device="cuda")
        gathered = logits.new_empty(group.size * 32, logits.shape[1])

        def step() -> None:
            for _ in range(2 * layers + 1):
                dist.all_reduce(x)
            all_gather_rows(gathered, logits)

        results[name] = {"collectives": 2 * layers + 2, "graph_ms": _graph_ms(step), "eager_ms": _time_ms(step, 20)}
        if group.rank == 0:
            out.write_text(json.dumps(results, indent=2))
    group.finish()


def _graph_ms(fn, reps: int = 20) -> float:
    import torch

    from tandem.bench.roofline import _time_ms

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    ms = _time_ms(graph.replay, reps)
    graph.reset()  # before the process group goes: NCCL cannot tear down under a live graph
    return ms


def _generate(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _tp_tokens(model: str, tp: int, prompts, params, **options) -> dict[str, list[list[int]]]:
    """Tokens of a tp-rank engine in sync then async mode (one engine, switched between runs)."""
    from tandem import LLM

    llm = LLM(model, tensor_parallel_size=tp, async_batching=False, **options)
    try:
        sync = _generate(llm, prompts, params)
        llm.engine.core.set_async(True)
        return {"sync": sync, "async": _generate(llm, prompts, params),
                "preemptions": llm.engine.core.scheduler.num_preemptions}
    finally:
        llm.engine.shutdown()


def _constrained() -> tuple[list[list[int]], list]:
    """Two requests under grammars (a choice, greedy; a JSON schema, seeded): their steps wait for a mask."""
    from tandem import SamplingParams
    from tandem.structured_outputs import StructuredOutputsParams as Constraint

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    return [[11, 12, 13], [21, 22]], [
        SamplingParams(temperature=0, max_tokens=16, structured_outputs=Constraint(choice=["yes", "no"])),
        SamplingParams(temperature=0.9, seed=5, max_tokens=24, structured_outputs=Constraint(json=schema))]


def smoke(out: Path, tp: int) -> None:
    from checkpoints import build_checkpoint
    from tp_cases import mixed_requests

    from tandem import LLM

    constrained = _constrained()

    settings = dict(dtype="float32", max_num_batched_tokens=16, kv_cache_tokens=96, block_size=8, max_model_len=96,
                    max_num_seqs=8)
    prompts, params = mixed_requests()
    prompts, params = prompts + constrained[0], params + constrained[1]  # masks reach every rank (CUDA path)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen3"):
            path = str(build_checkpoint(arch, Path(tmp) / arch))
            ref = LLM(path, **settings)
            expected = _generate(ref, prompts, params)
            ref.engine.shutdown()
            got = _tp_tokens(path, tp, prompts, params, **settings)
            results[arch] = {mode: got[mode] == expected for mode in ("sync", "async")}
            results[arch]["preemptions"] = got["preemptions"]
            print(f"smoke {arch}: tp={tp} == tp=1: {results[arch]}", flush=True)
    out.write_text(json.dumps(results, indent=2))


def fp32(out: Path, tp: int) -> None:
    import torch

    from tandem import LLM, SamplingParams

    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in (16, 23, 31, 40, 47, 52, 60, 64)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, detokenize=False)
    options = dict(dtype="float32", max_num_seqs=8, kv_cache_tokens=8192, max_model_len=512)
    got = _tp_tokens("random:llama3-8b", tp, prompts, params, **options)
    ref = LLM("random:llama3-8b", **options)
    expected = _generate(ref, prompts, params)
    ref.engine.shutdown()
    del ref
    result = {mode: sum(a == b for a, b in zip(got[mode], expected)) for mode in ("sync", "async")}
    result["prompts"] = len(prompts)
    parted = [(p, e, g) for p, e, g in zip(prompts, expected, got["async"]) if e != g]
    result["mismatches"] = [_divergence(*case) for case in parted[:3]]
    print(f"fp32 random:llama3-8b tp={tp} vs tp=1: {result}", flush=True)
    out.write_text(json.dumps(result, indent=2))


def _divergence(prompt: list[int], expected: list[int], got: list[int]) -> dict:
    """Where two greedy continuations part, and tp=1's gap between its top two logits there."""
    import torch

    from gpu_parity import prefill_logits

    at = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
    logits = prefill_logits("random:llama3-8b", prompt + expected[:at], "cuda", torch.float32)[-1]
    top = logits.topk(2).values.tolist()
    return {"position": at, "top2_gap": top[0] - top[1], "logit_scale": logits.std().item()}


# --- the driver ----------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: float


def _steps(out: Path, work: Path, tp: int) -> list[Step]:
    me, tandem = [sys.executable, __file__], [sys.executable, "-m", "tandem.cli", "-v", "bench"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)]
    s70 = ["--model", "random:llama3-70b", "--tensor-parallel-size", str(tp), "--modes", "sync,async", *S_ARGS,
           "--json", str(out / f"S70b_tp{tp}.json"), "--timeline", str(out / f"S70b_tp{tp}_timeline.png")]
    s8 = ["--model", "random:llama3-8b", "--modes", "async", *S_ARGS]
    return [Step("allreduce", torchrun + [__file__, "_allreduce", str(work / "allreduce.json")], 90),
            Step("smoke", me + ["_smoke", str(work / "smoke.json"), str(tp)], 100),
            Step("S70b", tandem + s70, 300),
            Step("fp32", me + ["_fp32", str(work / "fp32.json"), str(tp)], 150),
            Step("S_tp1", tandem + s8 + ["--json", str(out / "S_tp1.json")], 120),
            Step(f"S_tp{tp}", tandem + s8 + ["--tensor-parallel-size", str(tp), "--json", str(out / f"S_tp{tp}.json")],
                 120)]


def _run(step: Step, log, deadline: float) -> str:
    left = deadline - time.monotonic()
    if left < 30:
        return "skipped (time budget)"
    log.write(f"\n===== {step.name}: {' '.join(step.cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(step.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **ENV},
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=min(step.timeout_s, left))
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:  # the step's own process group: its ranks too (torchrun forwards TERM)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = f"timed out after {min(step.timeout_s, left):.0f} s"
    print(f"[{time.strftime('%H:%M:%S')}] {step.name}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    return status


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _bench_row(name: str, data: dict | None) -> list[str]:
    if data is None:
        return [f"{name}: no result"]
    rows = []
    for mode, m in data["modes"].items():
        check = m.get("decode_step_check") or {}
        rows.append(f"{name} {mode}: {m['output_tok_per_s']:.0f} tok/s, GPU {_f(m['mean_gpu_ms'], '.2f')} ms/step, "
                    f"decode step {_f(check.get('measured_gpu_ms'), '.2f')} ms (memory floor "
                    f"{_f(check.get('memory_floor_ms'), '.2f')}), idle {_f(m['gpu_idle_fraction'], '.2%')} (decode "
                    f"{_f(m['gpu_idle_fraction_decode'], '.2%')}), roofline {_f(m['roofline_fraction'], '.1%')}")
    return rows


def summarise(out: Path, work: Path, tp: int, statuses: dict[str, str]) -> None:
    results = {name: _load(work / f"{name}.json") for name in ("allreduce", "smoke", "fp32")}
    benches = {name: _load(out / f"{name}.json") for name in (f"S70b_tp{tp}", "S_tp1", f"S_tp{tp}")}
    (out / "summary.json").write_text(json.dumps({"statuses": statuses, **results, "bench": benches}, indent=2))
    print("\n===== summary (tp=%d)" % tp)
    for name, status in statuses.items():
        print(f"{name:10s} {status}")
    for name, r in results.items():
        print(f"{name}: {json.dumps(r)}")
    for name, data in benches.items():
        print("\n".join(_bench_row(name, data)))
    steps = [(b or {}).get("modes", {}).get("async", {}).get("decode_step_check") or {} for b in
             (benches["S_tp1"], benches[f"S_tp{tp}"])]
    collectives = (results["allreduce"] or {}).get("llama3-8b", {}).get("graph_ms")
    print(f"S async, one decode step: tp=1 {_f(steps[0].get('measured_gpu_ms'), '.2f')} ms, tp={tp} "
          f"{_f(steps[1].get('measured_gpu_ms'), '.2f')} ms; its collectives alone (graph) {_f(collectives, '.3f')} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=560)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory() as work, open(args.out / "log.txt", "a") as log:
        statuses = {}
        try:
            for step in _steps(args.out, Path(work), args.tp):
                statuses[step.name] = _run(step, log, deadline)
        finally:
            summarise(args.out, Path(work), args.tp, statuses)
    return 0 if all(s == "ok" for s in statuses.values()) else 1


SUBCOMMANDS = {"_allreduce": lambda a: allreduce_bench(Path(a[0])), "_smoke": lambda a: smoke(Path(a[0]), int(a[1])),
               "_fp32": lambda a: fp32(Path(a[0]), int(a[1]))}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        SUBCOMMANDS[sys.argv[1]](sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
