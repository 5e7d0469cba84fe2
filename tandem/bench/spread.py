"""Several runs of each mode: min / median / max of the figures that swing from run to run, the
async/sync ratio run by run, and which run stands for a mode (its median by wall time)."""
from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any

from tandem.bench.metrics import ModeResult

#: the figures a spread is given for: (table header, ModeResult field, format)
SPREAD_FIELDS = (("wall s", "wall_s", "{:.2f}"), ("out tok/s", "output_tok_per_s", "{:.0f}"),
                 ("GPU idle", "gpu_idle_fraction", "{:.1%}"))


@dataclass(frozen=True)
class Spread:
    lo: float
    median: float
    hi: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(min(values), median(values), max(values))

    def text(self, fmt: str) -> str:
        return f"{fmt.format(self.median)} [{fmt.format(self.lo)}-{fmt.format(self.hi)}]"

    @property
    def relative_range(self) -> float:
        """(max - min) / median: how far the runs are apart."""
        return (self.hi - self.lo) / self.median if self.median else 0.0


def spreads(results: list[ModeResult]) -> dict[str, Spread]:
    """Per figure of ``SPREAD_FIELDS`` measured in every run."""
    out = {}
    for _, attr, _ in SPREAD_FIELDS:
        values = [getattr(r, attr) for r in results]
        if all(v is not None for v in values):
            out[attr] = Spread.of(values)
    return out


def median_run(results: list[ModeResult]) -> int:
    """Index of the run with the median wall time (the lower middle one of an even count)."""
    order = sorted(range(len(results)), key=lambda i: results[i].wall_s)
    return order[(len(order) - 1) // 2]


def spread_table(by_mode: dict[str, list[ModeResult]], gpu: bool) -> str:
    """One row per mode: median [min-max] of each figure (GPU idle only where ``gpu``)."""
    fields = [f for f in SPREAD_FIELDS if gpu or f[1] != "gpu_idle_fraction"]
    rows = [["mode"] + [h for h, _, _ in fields]]
    for mode, results in by_mode.items():
        s = spreads(results)
        rows.append([mode] + [s[attr].text(fmt) if attr in s else "n/a" for _, attr, fmt in fields])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def async_sync_ratio(by_mode: dict[str, list[ModeResult]]) -> Spread | None:
    """async wall / sync wall, run i against run i (both ran in the same round)."""
    if "sync" not in by_mode or "async" not in by_mode:
        return None
    return Spread.of([a.wall_s / s.wall_s for s, a in zip(by_mode["sync"], by_mode["async"])])


def ratio_text(by_mode: dict[str, list[ModeResult]]) -> str | None:
    ratio = async_sync_ratio(by_mode)
    if ratio is None:
        return None
    runs = len(by_mode["sync"])
    per_run = f" (median of {runs} runs; {ratio.lo:.2f}-{ratio.hi:.2f} run by run)" if runs > 1 else ""
    faster = (f"async {1 / ratio.median:.2f}x as fast" if ratio.median <= 1
              else f"async {ratio.median:.2f}x as slow")
    return f"async/sync wall time: {ratio.median:.2f}{per_run}: {faster}"


def spread_record(by_mode: dict[str, list[ModeResult]]) -> dict[str, Any]:
    """For the JSON: each mode's [min, median, max] per figure, and the ratio."""
    out: dict[str, Any] = {mode: {attr: [s.lo, s.median, s.hi] for attr, s in spreads(results).items()}
                           for mode, results in by_mode.items()}
    ratio = async_sync_ratio(by_mode)
    if ratio is not None:
        out["async_over_sync_wall"] = [ratio.lo, ratio.median, ratio.hi]
    return out
