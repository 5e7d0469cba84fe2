"""The benchmark's table and its machine-readable record."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tandem.bench.metrics import ModeResult
from tandem.bench.spread import ratio_text, spread_table

#: (header, ModeResult field, format); the GPU's columns only where the device lane is a GPU's
COLUMNS = [("wall s", "wall_s", "{:.2f}"), ("out tok/s", "output_tok_per_s", "{:.0f}"), ("steps", "num_steps", "{}"),
           ("cache hit", "prefix_cache_hit_rate", "{:.1%}"), ("host ms", "mean_host_ms", "{:.2f}"),
           ("wait ms", "mean_wait_ms", "{:.2f}")]
GPU_COLUMNS = [("GPU ms", "mean_gpu_ms", "{:.2f}"), ("GPU idle", "gpu_idle_fraction", "{:.2%}"),
               ("idle dec", "gpu_idle_fraction_decode", "{:.2%}"), ("roofline", "roofline_fraction", "{:.1%}")]


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def table(results: list[ModeResult], gpu: bool = True, skip: tuple[str, ...] = ()) -> str:
    """One row per mode, at most 100 columns; ``skip``: fields left out."""
    columns = [c for c in COLUMNS + (GPU_COLUMNS if gpu else []) if c[1] not in skip]
    rows = [["mode"] + [c[0] for c in columns]]
    rows += [[r.mode] + [_cell(getattr(r, attr), fmt) for _, attr, fmt in columns] for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def anchor_text(a: dict) -> str:
    """One transformers ``generate_batch`` run (``--compare-hf``), under the table."""
    head = f"hf generate_batch {a['mode']}:"
    if a.get("error"):
        return textwrap.shorten(f"{head} failed: {a['error']}", 100, placeholder=" ...")
    agree = a.get("first_token_agreement")
    agree = "" if agree is None else f", same first token {agree:.0%}"
    return f"{head} {a['wall_s']:.2f} s, {a['output_tok_per_s']:.0f} out tok/s{agree}"


def phases_text(res: ModeResult) -> str:
    """The host's mean ms per step, phase by phase (``host ms`` in the table is their sum)."""
    submit = "submit+device" if res.mode == "sync" else "submit"  # a sync submit returns after the step
    return (f"host ms/step ({res.mode}): schedule {res.mean_schedule_ms:.3f}, build {res.mean_build_ms:.3f}, "
            f"{submit} {res.mean_submit_ms:.3f}, process {res.mean_process_ms:.3f}")


def preemption_text(results: list[ModeResult], kv_tokens: int, need: int) -> str:
    """Whether requests were preempted, and why: ``kv_tokens`` the cache holds, ``need`` the most
    the workload's concurrently running requests can hold at once."""
    counts = ", ".join(f"{r.mode} {r.num_preemptions}" for r in results)
    if not any(r.num_preemptions for r in results):
        return (f"preemptions: none (the KV cache holds {kv_tokens:,} tokens; the workload needs at most "
                f"{need:,} at once)")
    why = (f"the workload's running requests need up to {need:,} KV tokens at once, the cache holds {kv_tokens:,}"
           if need > kv_tokens else f"the cache ({kv_tokens:,} tokens) ran short")
    return textwrap.fill(f"preemptions: {counts}: {why}. A preempted request gives its blocks back and "
                         f"recomputes its tokens later (more steps and prefill than the workload needs); a larger "
                         f"--kv-cache-tokens or a smaller --max-num-seqs avoids it.", 100, break_on_hyphens=False)


def decode_check_text(res: ModeResult) -> str:
    c = res.decode_step_check
    if c is None:
        return "floor check: n/a (no device timings)"
    experts = f", {c['experts_read']:.1f} experts read per MoE layer" if c.get("experts_read") else ""
    return (f"floor check ({res.mode}, decode step {c['step_id']}: {c['num_seqs']} seqs, {c['kv_tokens']} KV tokens"
            f"{experts}): "
            f"{c['bytes'] / 1e9:.3f} GB moved, {c['flops'] / 1e12:.3f} TFLOP; memory floor "
            f"{c['memory_floor_ms']:.3f} ms, compute floor {c['compute_floor_ms']:.3f} ms, "
            f"measured {c['measured_gpu_ms']:.3f} ms "
            f"(copy {c['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
            f"GEMM {c['ceilings']['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s)")


def report_real(by_mode: dict[str, list[Any]], results: list[ModeResult], anchors: list[dict] | None,
                meta: dict[str, Any], gpu: bool, need: int, kv_tokens: int) -> None:
    """Print the real run's figures: ``by_mode`` every run (``ModeRun``s), ``results`` each mode's median run."""
    rounds = len(next(iter(by_mode.values())))
    by_result = {m: [r.result for r in runs] for m, runs in by_mode.items()}
    if rounds > 1:
        print(f"{rounds} runs of each mode, median [min-max]:")
        print(spread_table(by_result, gpu))
        print("the median runs:")
    print(table(results, gpu))
    for a in anchors or []:
        print(anchor_text(a))
    ratio = ratio_text(by_result)
    if ratio:
        print(ratio + ("" if gpu else " (on a CPU: see the note above)"))
    for res in results:
        print(phases_text(res))
    print(preemption_text(results, kv_tokens, need))
    for res in (r for r in results if r.spec_draft_tokens is not None):
        print(f"{res.mode}: speculative decoding accepted {_cell(res.spec_acceptance_rate, '{:.1%}')} of "
              f"{res.spec_draft_tokens} proposals, {_cell(res.spec_tokens_per_step, '{:.2f}')} tokens per speculating step")
    if gpu:
        for res in results:
            print(decode_check_text(res))
    print(f"outputs identical across modes{' and runs' if rounds > 1 else ''}: "
          f"{meta['outputs_identical_across_modes']} (digest {meta.get('outputs_digest')})")


def _commit() -> str | None:
    if os.environ.get("TANDEM_COMMIT"):
        return os.environ["TANDEM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict[str, Any]:
    """What every benchmark file starts with: the command, the date (UTC), the commit."""
    return {"command": " ".join(["tandem", *sys.argv[1:]]) if sys.argv else None,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit()}


def record(results: list[ModeResult], meta: dict[str, Any], anchors: list[dict] | None) -> dict[str, Any]:
    return {
        **provenance(),
        "torch": torch.__version__,
        **meta,
        "modes": {r.mode: {k: v for k, v in asdict(r).items() if k != "timeline"} for r in results},
        "hf_anchor": anchors,
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
