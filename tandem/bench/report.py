"""The benchmark's table and its machine-readable record."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tandem.bench.metrics import ModeResult

COLUMNS = [("wall s", "wall_s", "{:.2f}"), ("out tok/s", "output_tok_per_s", "{:.0f}"),
           ("total tok/s", "total_tok_per_s", "{:.0f}"), ("steps", "num_steps", "{}"),
           ("prefill tok", "prefill_tokens_computed", "{}"), ("cache hit", "prefix_cache_hit_rate", "{:.1%}"),
           ("sched ms", "mean_schedule_ms", "{:.3f}"), ("build ms", "mean_build_ms", "{:.3f}"),
           ("submit ms", "mean_submit_ms", "{:.3f}"), ("wait ms", "mean_wait_ms", "{:.3f}"),
           ("process ms", "mean_process_ms", "{:.3f}"), ("GPU ms", "mean_gpu_ms", "{:.3f}"),
           ("GPU idle", "gpu_idle_fraction", "{:.2%}"), ("idle decode", "gpu_idle_fraction_decode", "{:.2%}"),
           ("roofline", "roofline_fraction", "{:.1%}")]


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def table(results: list[ModeResult], anchors: list[dict] | None = None) -> str:
    rows = [["mode"] + [c[0] for c in COLUMNS]]
    rows += [[r.mode] + [_cell(getattr(r, attr), fmt) for _, attr, fmt in COLUMNS] for r in results]
    for a in anchors or []:
        row = [f"hf:{a['mode']}"] + ["n/a"] * len(COLUMNS)
        if a.get("error"):
            row[1] = "error"
        else:
            row[1], row[2] = f"{a['wall_s']:.2f}", f"{a['output_tok_per_s']:.0f}"
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


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
