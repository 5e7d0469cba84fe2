"""The GPU runs that issues 8, 9, 11, 25 and 28 are judged by, as named plans, with one short table at
the end.

    python3 scripts/acceptance_runs.py OUT_DIR [--plans checks,offline,long,traffic,serve] [--deadline-s S]

Each run's command, output and exit status go to OUT_DIR/log.txt (``### command`` ... ``rc=N``), its
figures to OUT_DIR/<name>.json, and the table to OUT_DIR/summary.txt and stdout. A run that would
start after ``--deadline-s`` seconds is skipped and listed as such, so one call can be given a plan
larger than its time and still report what it measured. ``--tiny`` runs every plan's shape with
``random:tiny`` and a few requests (the CPU test of this script); its figures mean nothing.

Plans (the commands of benchmarks/RESULTS.md):
- checks: the differential (60 cases), prefix caching on == off, the executor smoke test, no hidden sync.
- offline: M (sync and async), M at 1024 sequences, S (sync and async).
- long: M at ``max_model_len`` 131072 (block tables as wide as the model allows).
- traffic: V (512 requests, prompts 16:4096, outputs 16:1024, 8B) at 2048 batched tokens, sync and async.
- structured: the structured-output GPU checks (scripts/gpu_structured.py), then M with every request
  constrained by a JSON schema (sync and async) beside M unconstrained, in one call for the cost.
- seam: the models of the model seam: Gemma 3 1B at M's shape and 4B at S's (sync and async), and the
  transformers backend against the native model at 32 x (256 + 512); on CUDA first the Gemma kernels' check.
- spec: speculative decoding on the 8B shape (issue 27): the draft's graph check, then at batch 1 and 32
  no speculation against the target as its own draft (k = 4), and prompts repeating a 32-token span with
  repetition penalty 0.5 without and with n-gram (k = 4, speculating up to 64 sequences).
- quant: quantization on the 8B shape (issue 25): the W4A16 and FP8 checks, then batch 1 in bf16 and
  ``--quantization int4``, and S in bf16 and ``--quantization fp8``.
- moe: the fused-MoE kernel's check (bf16, FP8 and 4-bit experts), then Qwen3-30B-A3B at 64 x (256 +
  1024), sync and async, and async with ``--quantization fp8``.
- pdl: the quant plan's runs with programmatic dependent launch off and on (``TANDEM_PDL``), each
  printing its outputs' digest (the same tokens either way).
- serve: the 1B model offline with 64 and 256 sequences in flight (2,048 and 4,096 requests), then
  served to 64 and 256 streaming clients with the same requests (two runs each, >= 30 s each).
- serve_api4, serve_si8: the served runs (one each) against a server with ``--api-server-count 4``, or
  with ``--stream-interval 8``; serve_api4_ramp: as serve_api4 with the admission ramp
  (``TANDEM_ADMIT_RAMP=1`` in the server); serve_offline: the serve plan's offline runs alone, their
  baseline. Each served plan's server writes ``<plan>_server_steps.json`` when it stops
  (``TANDEM_STEP_LOG``: its idle time and longest gaps between steps, with the host's phases).
- seed: the 8B model at 32 x (256 + 8192), async: bf16, FP8 KV, FP8 KV and FP8 weights.
- b1: batch 1 at 256 + 1024, async: the 1B and the 8B model.
- chat: 1,000 requests x (16:512 + 16:400) at temperature 0.8, async: the 1B and the 8B model.
- gemv: the b1 plan with the one-row Triton GEMV off and on (``TANDEM_GEMV=0/1``).
- admit: the serve_offline runs with the admission ramp off and on (``TANDEM_ADMIT_RAMP=0/1``).
- graphs: the serve_offline runs with piecewise graphs up to 512 tokens (the default), 2,048 and
  8,192 (``TANDEM_PIECEWISE_MAX_TOKENS``: a padded bucket costs compute, an eager step launches),
  and up to 2,048 with the admission ramp.

On an H100: checks + offline + long take about 5 minutes, traffic about 5 (V alone ran 104 s per mode),
serve about 5 (2026-12-06: 302 s with the agreement check), moe about 3, seed about 5, serve_offline
about 2 (2026-12-07: two 30-s runs), so admit about 4 and graphs about 8; a call runs at
most 10 minutes, so give each its own or set ``--deadline-s``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tandem.cli"]
ONE_B, EIGHT_B = "random:llama3.2-1b", "random:llama3-8b"


@dataclass
class Run:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "bench"  # bench | serve (a bench-serve client) | check (pass or fail only)


def _bench(name: str, model: str, n: int, prompt: str, out: str, *extra: str) -> Run:
    return Run(name, CLI + ["bench", "--model", model, "--num-requests", str(n), "--prompt-len", prompt,
                            "--max-tokens", out, "--no-progress", *extra])


def plans(tiny: bool) -> dict[str, list[Run]]:
    one_b, eight_b = ("random:tiny", "random:tiny") if tiny else (ONE_B, EIGHT_B)
    gemma_1b, gemma_4b = ("random:tiny-gemma3",) * 2 if tiny else ("random:gemma3-1b", "random:gemma3-4b")
    n = (lambda k: min(k, 8)) if tiny else (lambda k: k)
    ln = (lambda k: str(min(int(k), 16))) if tiny else str
    checks = ["smoke"] if tiny else ["smoke", "differential", "prefix", "nosync"]
    named = {
        "checks": [Run("checks", [sys.executable, "scripts/gpu_checks.py", *checks], {"TANDEM_DIFF_CASES": "60"},
                       "check")],
        "offline": [
            _bench("M", one_b, n(256), ln(256), ln(512)),
            _bench("M1024", one_b, n(1024), ln(256), ln(512), "--max-num-seqs", str(n(1024)), "--modes", "async"),
            _bench("S", eight_b, n(32), ln(256), ln(1024), "--max-num-seqs", str(n(32))),
        ],
        "long": [_bench("M_len131072", one_b, n(256), ln(256), ln(512), "--max-model-len", "131072" if not tiny
                        else "512", "--modes", "async")],
        "traffic": [_bench("V_2048", eight_b, n(512), "16:" + ln(4096), "16:" + ln(1024), "--max-model-len",
                           "8192" if not tiny else "256", "--max-num-batched-tokens", "2048")],
        "structured": ([] if tiny else [  # the checks need CUDA
            Run("structured_checks", [sys.executable, "scripts/gpu_checks.py", "structured"], {}, "check")]) + [
            _bench("M_json", one_b, n(256), ln(256), ln(512), "--structured-output", "json"),
            _bench("M_free", one_b, n(256), ln(256), ln(512), "--modes", "async"),
        ],
        "seam": ([] if tiny else [Run("gemma_checks", [sys.executable, "scripts/gpu_checks.py", "gemma"],
                                       {"TANDEM_DIFF_CASES": "10"}, "check")]) + [
            _bench("G1", gemma_1b, n(256), ln(256), ln(512)),
            _bench("G4", gemma_4b, n(32), ln(256), ln(1024), "--max-num-seqs", str(n(32))),
            _bench("TB_native", one_b, n(32), ln(256), ln(512), "--max-num-seqs", str(n(32)), "--modes", "async"),
            _bench("TB", one_b, n(32), ln(256), ln(512), "--max-num-seqs", str(n(32)), "--model-impl", "transformers"),
        ],
        "spec": _spec_plan(tiny, eight_b, n, ln),
        "quant": ([] if tiny else [Run("quant_checks", [sys.executable, "scripts/gpu_checks.py", "w4a16", "fp8"], {},
                                       "check")]) + [
            _bench("b1_bf16", eight_b, 1, ln(256), ln(512), "--max-num-seqs", "1", "--modes", "async"),
            _bench("b1_int4", eight_b, 1, ln(256), ln(512), "--max-num-seqs", "1", "--modes", "async",
                   "--quantization", "int4"),
            _bench("S_bf16", eight_b, n(32), ln(256), ln(1024), "--max-num-seqs", str(n(32)), "--modes", "async"),
            _bench("S_fp8", eight_b, n(32), ln(256), ln(1024), "--max-num-seqs", str(n(32)), "--modes", "async",
                   "--quantization", "fp8"),
        ],
        "moe": ([] if tiny else [Run("moe_checks", [sys.executable, "scripts/gpu_checks.py", "moe"], {}, "check")]) + [
            _bench(f"Q30{suffix}", "random:tiny-qwen3-moe" if tiny else "random:qwen3-30b-a3b", n(64), ln(256),
                   ln(1024), "--max-num-seqs", str(n(64)), *extra)
            for suffix, extra in (("", ()), ("_fp8", ("--modes", "async", "--quantization", "fp8")))],
        "serve": _serve_plan(one_b, n, ln),
        # the same clients against a server with four API processes, or with streamed events of eight
        # tokens (SERVER_OPTIONS), without the offline runs
        **{name: [Run(f"{r.name}_{name.removeprefix('serve_')}", r.argv, r.env, r.kind)
                  for r in _serve_plan(one_b, n, ln) if r.kind == "serve" and r.name.endswith("_a")]
           for name in ("serve_api4", "serve_si8", "serve_api4_ramp")},
        # their baseline on the same card: the offline runs alone
        "serve_offline": [r for r in _serve_plan(one_b, n, ln) if r.kind == "bench"],
        # issue 28's table, the rows no plan above measures: the seed experiment (bf16, then FP8 KV, then
        # FP8 KV and weights), batch 1, and chat-like traffic (mixed lengths, sampled)
        "seed": [_bench(f"seed{suffix}", eight_b, n(32), ln(256), ln(8192), "--max-num-seqs", str(n(32)),
                        "--allow-long-max-model-len", "--modes", "async", *extra)
                 for suffix, extra in (("", ()), ("_kv_fp8", ("--kv-cache-dtype", "fp8")),
                                       ("_kv_fp8_w_fp8", ("--kv-cache-dtype", "fp8", "--quantization", "fp8")))],
        "b1": [_bench(f"b1_{name}", model, 1, ln(256), ln(1024), "--max-num-seqs", "1", "--modes", "async")
               for name, model in (("1b", one_b), ("8b", eight_b))],
        "chat": [_bench(f"chat_{name}", model, n(1000), "16:" + ln(512), "16:" + ln(400), "--temperature", "0.8",
                        "--modes", "async") for name, model in (("1b", one_b), ("8b", eight_b))],
    }
    # programmatic dependent launch off and on, same call (kernels/pdl.py): figures and output digests
    named["pdl"] = [Run(f"{r.name}_pdl{v}", r.argv, {"TANDEM_PDL": v}) for r in named["quant"] if r.kind == "bench"
                    for v in ("0", "1")]
    # the one-row GEMV (kernels/gemv.py) off and on at batch 1, same call (TANDEM_GEMV)
    named["gemv"] = [Run(f"{r.name}_gemv{v}", r.argv, {"TANDEM_GEMV": v}) for r in named["b1"] for v in ("0", "1")]
    # the admission ramp (engine/admission.py) off and on, same call (TANDEM_ADMIT_RAMP): the served runs'
    # offline baseline, whose idle time was the waves of admissions
    named["admit"] = [Run(f"{r.name}_ramp{v}", r.argv, {"TANDEM_ADMIT_RAMP": v}) for r in named["serve_offline"]
                      for v in ("0", "1")]
    # mixed steps past 512 tokens through piecewise graphs (TANDEM_PIECEWISE_MAX_TOKENS), alone and with the ramp
    named["graphs"] = [Run(f"{r.name}_pw{top}_ramp{ramp}", r.argv,
                           {"TANDEM_PIECEWISE_MAX_TOKENS": top, "TANDEM_ADMIT_RAMP": ramp})
                       for r in named["serve_offline"]
                       for top, ramp in (("512", "0"), ("2048", "0"), ("8192", "0"), ("2048", "1"))]
    if tiny:  # on a CPU `tandem bench` would repeat each run and add the simulated GPU: one run, as on a GPU
        for run in (r for runs in named.values() for r in runs if r.kind == "bench"):
            run.argv = run.argv + ["--runs", "1", "--simulated-device", "off"]  # a new list: plans share argvs
    return named


def _spec_plan(tiny: bool, model: str, n, ln) -> list[Run]:
    draft = json.dumps({"method": "draft", "model": model, "num_speculative_tokens": 4})
    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 64})
    repeats = ["--repeat-span", ln(32), "--repetition-penalty", "0.5"]
    runs = [] if tiny else [Run("spec_checks", [sys.executable, "scripts/gpu_checks.py", "spec"], {}, "check")]
    for b in (1, n(32)):
        common = ["--max-num-seqs", str(b), "--modes", "async"]
        runs += [_bench(f"b{b}_none", model, b, ln(256), ln(512), *common),
                 _bench(f"b{b}_draft", model, b, ln(256), ln(512), *common, "--speculative-config", draft),
                 _bench(f"b{b}_rep_none", model, b, ln(256), ln(512), *common, *repeats),
                 _bench(f"b{b}_rep_ngram", model, b, ln(256), ln(512), *common, *repeats, "--speculative-config", ngram)]
    return runs


def _serve_plan(model: str, n, ln) -> list[Run]:
    """Issue 28's serving goal: 64 and 256 streaming clients, each run long enough (>= 30 s on the H100)
    that ramp-up and drain are a small part, each beside the same workload offline (`tandem bench` with
    as many sequences in flight as clients)."""
    runs = []
    for clients, total in ((64, 2048), (256, 4096)):
        runs.append(_bench(f"offline_{clients}", model, n(total), ln(256), ln(512), "--max-num-seqs",
                           str(n(clients)), "--max-model-len", "768", "--modes", "async"))
        runs += [Run(f"serve_{clients}_{k}", CLI + ["bench-serve", "--num-clients", str(n(clients)), "--num-requests",
                                                   str(n(total)), "--prompt-len", ln(256), "--max-tokens", ln(512),
                                                   "--seed", str(seed)], kind="serve")
                 for k, seed in (("a", 21), ("b", 31))]
    return runs


# a plan's server options beyond _server_argv's: several API processes split tokenizing, detokenizing and
# streaming, which one process cannot keep up with at 256 streams of the 1B model; or fewer, larger events
SERVER_OPTIONS = {"serve_api4": ["--api-server-count", "4"], "serve_si8": ["--stream-interval", "8"],
                  "serve_api4_ramp": ["--api-server-count", "4"]}
# a plan's server environment beyond this process's: the admission ramp (engine/admission.py)
SERVER_ENV = {"serve_api4_ramp": {"TANDEM_ADMIT_RAMP": "1"}}


def _server_argv(tiny: bool, port: int, plan: str = "serve") -> list[str]:
    return CLI + ["serve", "--model", "random:tiny" if tiny else ONE_B, "--max-num-seqs", "8" if tiny else "256",
                  "--max-model-len", "768", "--port", str(port), *SERVER_OPTIONS.get(plan, [])]


class Server:
    """``tandem serve`` in the background for the serve plan's clients."""

    def __init__(self, argv: list[str], port: int, log, env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        named = "".join(f"{k}={v} " for k, v in (env or {}).items())
        log.write(f"### {named}{' '.join(argv)} (background)\n")
        log.flush()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(1)
        return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def execute(run: Run, out_dir: Path, log, url: str | None) -> int:
    argv = list(run.argv)
    if run.kind != "check":
        argv += ["--json", str(out_dir / f"{run.name}.json")]
    if run.kind == "serve":
        argv += ["--url", url]
    log.write(f"### {''.join(f'{k}={v} ' for k, v in run.env.items())}{' '.join(argv)}\n")
    log.flush()
    done = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **run.env})
    log.write(f"rc={done.returncode}\n")
    log.flush()
    return done.returncode


def summary_row(run: Run, rc: int | None, out_dir: Path) -> str:
    """One line of the table: the figures the issues' acceptance points name."""
    if rc is None:
        return f"{run.name:<14} skipped (deadline or no server)"
    path = out_dir / f"{run.name}.json"
    if run.kind == "check" or rc != 0 or not path.is_file():
        return f"{run.name:<14} rc={rc}" + ("" if rc == 0 else "  FAILED: see log.txt")
    data = json.loads(path.read_text())
    if run.kind == "serve":
        idle = data.get("gpu_idle_fraction") or {}
        running = (data.get("server_sequences") or {}).get("running")
        seqs = "" if running is None else f"  running {running['mean']:.0f}"
        return (f"{run.name:<14} served {data['output_tok_per_s']:>9.0f} tok/s  TTFT p50/p99 "
                f"{data['ttft']['p50_ms']:.0f}/{data['ttft']['p99_ms']:.0f} ms  ITL p50/p99 {data['itl']['p50_ms']:.1f}/"
                f"{data['itl']['p99_ms']:.1f} ms  GPU idle {_pct(idle.get('run'))}{seqs}  errors {data['num_errors']}")
    rows = []
    for mode, m in data["modes"].items():
        step = m.get("decode_step_check") or {}
        measured, floor = step.get("measured_gpu_ms"), step.get("memory_floor_ms")
        frac = f"{floor / measured:.3f}" if measured and floor else "n/a"
        roof = m.get("roofline_fraction")
        spec = "" if m.get("spec_draft_tokens") is None else (
            f"  accepted {_pct(m.get('spec_acceptance_rate'))} of {m['spec_draft_tokens']}, "
            f"{m.get('spec_tokens_per_step') or 1:.2f} tokens/step")
        rows.append(f"{run.name:<14} {mode:<5} {m['wall_s']:>7.2f} s {m['output_tok_per_s']:>9.0f} tok/s  idle "
                    f"{_pct(m.get('gpu_idle_fraction'))} (decode {_pct(m.get('gpu_idle_fraction_decode'))})  floor "
                    f"{'n/a' if roof is None else f'{roof:.3f}'}  decode step/floor {frac}{spec}")
    same = data.get("outputs_identical_across_modes")
    return "\n".join(rows) + ("" if same is None else f"  sync == async: {same}") + f"  digest {data.get('outputs_digest')}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--plans", default="checks,offline,long,traffic,serve")
    p.add_argument("--deadline-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--port", type=int, default=8017)
    p.add_argument("--tiny", action="store_true", help="random:tiny and a few requests: checks the script itself")
    args = p.parse_args()
    table = plans(args.tiny)
    chosen = [name.strip() for name in args.plans.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in table]
    if unknown:
        p.error(f"unknown plan(s) {', '.join(unknown)}; known: {', '.join(table)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start, lines = time.monotonic(), []
    with open(args.out_dir / "log.txt", "a") as log:
        for name in chosen:
            lines += run_plan(table[name], args, log, start, name)
    text = "\n".join(lines)
    (args.out_dir / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all("FAILED" not in line for line in lines) else 1


def run_plan(runs: list[Run], args: argparse.Namespace, log, start: float, plan: str = "serve") -> list[str]:
    """The plan's own runs first, then its served runs against one server: an offline run beside the
    server would find the GPU's memory already taken by it (its KV cache sizes to what is free)."""
    own = [r for r in runs if r.kind != "serve"]
    served = [r for r in runs if r.kind == "serve"]
    lines = [_execute_or_skip(run, args, log, start, None) for run in own]
    if not served:
        return lines
    server = None
    try:
        if time.monotonic() - start < args.deadline_s:
            env = {**SERVER_ENV.get(plan, {}), "TANDEM_STEP_LOG": str(args.out_dir / f"{plan}_server_steps.json")}
            server = Server(_server_argv(args.tiny, args.port, plan), args.port, log, env)
            if not server.wait_ready(600):
                log.write("the server did not become ready\n")
                server.stop()
                server = None
        return lines + [_execute_or_skip(run, args, log, start, server) for run in served]
    finally:
        if server is not None:
            log.write(f"server exit status {server.stop()}\n")


def _execute_or_skip(run: Run, args: argparse.Namespace, log, start: float, server: Server | None) -> str:
    late = time.monotonic() - start >= args.deadline_s
    rc = None if late or (run.kind == "serve" and server is None) else execute(
        run, args.out_dir, log, server.url if server else None)
    return summary_row(run, rc, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
