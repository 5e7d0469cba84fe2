"""Pictures of the overlap: a PNG with host and GPU lanes (sync above async), and a Chrome trace."""
from __future__ import annotations

import json
from pathlib import Path

from tandem.bench.metrics import ModeResult

PHASE_COLORS = {"schedule": "#4c72b0", "build": "#55a868", "submit": "#8172b2", "wait": "#dddddd",
                "process": "#c44e52", "gpu": "#dd8452"}


def _window(res: ModeResult, num_steps: int) -> tuple[float, float]:
    """A window of ``num_steps`` steady decode steps from the middle of the run (host clock)."""
    decode = res.timeline["decode_steps"] or [s for s, *_ in res.timeline["host"]]
    mid = len(decode) // 2
    chosen = set(decode[max(0, mid - num_steps // 2): mid + (num_steps + 1) // 2])
    times = [(a, b) for s, _, a, b in res.timeline["host"] if s in chosen]
    times += [(a, b) for s, a, b in res.timeline["gpu"] if s in chosen]
    return min(a for a, _ in times), max(b for _, b in times)


def draw_timeline(results: list[ModeResult], path: Path, num_steps: int = 8, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(14, 2.2 * len(results) + 0.6), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        t0, t1 = _window(res, num_steps)
        lanes = {"host": 1, "gpu": 0}
        for _, phase, a, b in res.timeline["host"]:
            if b >= t0 and a <= t1 and b > a:
                ax.barh(lanes["host"], (b - a) * 1e3, left=(a - t0) * 1e3, color=PHASE_COLORS[phase], height=0.6)
        for _, a, b in res.timeline["gpu"]:
            if b >= t0 and a <= t1:
                ax.barh(lanes["gpu"], (b - a) * 1e3, left=(a - t0) * 1e3, color=PHASE_COLORS["gpu"], height=0.6,
                        edgecolor="white", linewidth=0.6)  # a thin edge shows where one step ends
        idle = res.gpu_idle_fraction_decode
        label = f"{res.mode}: GPU idle {idle:.1%} over decode" if idle is not None else res.mode
        ax.set_title(label, loc="left", fontsize=10)
        ax.set_yticks([0, 1], ["GPU", "CPU"])
        ax.set_xlim(0, (t1 - t0) * 1e3)
        ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    fig.legend(handles, list(PHASE_COLORS), loc="upper right", ncol=len(PHASE_COLORS), fontsize=8)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_trace(results: list[ModeResult], path: Path) -> None:
    """Chrome trace format (open in Perfetto): one process per mode, a host and a GPU thread."""
    events = []
    for pid, res in enumerate(results):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": res.mode}})
        origin = min([a for _, _, a, _ in res.timeline["host"]] or [0.0])
        for step, phase, a, b in res.timeline["host"]:
            events.append({"ph": "X", "name": phase, "pid": pid, "tid": "cpu", "ts": (a - origin) * 1e6,
                           "dur": (b - a) * 1e6, "args": {"step": step}})
        for step, a, b in res.timeline["gpu"]:
            events.append({"ph": "X", "name": f"step {step}", "pid": pid, "tid": "gpu", "ts": (a - origin) * 1e6,
                           "dur": (b - a) * 1e6})
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
