"""How long a GPU takes for one step, from steps measured on an H100: the simulated device's clock.

A decode step's time grows with the KV tokens it reads (its sequences' contexts) over a fixed part
(the weights read once, launches): it is interpolated linearly between measured pure-decode steps
(``decode_step_check`` of the runs cited), and extrapolated along the nearest two beyond them. A
step that also prefills adds a measured time per prefill token: a run's GPU busy time less its
decode steps' (the interpolation at the middle decode step, times their number), over its prefill
tokens. ``tests/test_bench_cpu.py`` derives every figure again from the cited JSON files."""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from tandem.contract.step import StepInputs, field_offsets


@dataclass(frozen=True)
class DecodePoint:
    kv_tokens: int  # context tokens the step's attention reads, summed over its sequences
    ms: float  # measured GPU time of that step
    source: str  # benchmarks/results/ file whose decode_step_check it is


@dataclass(frozen=True)
class StepTimeModel:
    model: str  # the preset whose shapes were measured
    device: str
    points: tuple[DecodePoint, ...]  # ascending kv_tokens
    prefill_ms_per_token: float
    prefill_source: str  # the run the prefill cost comes from

    def decode_ms(self, kv_tokens: float) -> float:
        pts = self.points
        i = min(max(bisect_left([p.kv_tokens for p in pts], kv_tokens), 1), len(pts) - 1)
        a, b = pts[i - 1], pts[i]
        return a.ms + (b.ms - a.ms) * (kv_tokens - a.kv_tokens) / (b.kv_tokens - a.kv_tokens)

    def step_ms(self, num_tokens: int, num_seqs: int, kv_tokens: int) -> float:
        return self.decode_ms(kv_tokens) + self.prefill_ms_per_token * max(0, num_tokens - num_seqs)

    def step_s(self, step: StepInputs) -> float:
        start, size = field_offsets(step.shape)["seq_lens"]
        kv = int(np.sum(step.data[start:start + size]))
        return self.step_ms(step.shape.num_tokens, step.shape.num_seqs, kv) / 1e3

    @property
    def sources(self) -> list[str]:
        """The benchmarks/results/ files the figures come from."""
        return sorted({p.source for p in self.points} | {self.prefill_source})

    def describe(self) -> str:
        lo, hi = self.points[0], self.points[-1]
        return (f"{self.model} on an {self.device}: decode steps of {lo.ms:.2f}-{hi.ms:.2f} ms at "
                f"{lo.kv_tokens:,}-{hi.kv_tokens:,} KV tokens, interpolated between {len(self.points)} measured "
                f"ones; prefill {self.prefill_ms_per_token * 1e3:.2f} us a token; from {len(self.sources)} runs "
                f"in benchmarks/results/")


H100 = "NVIDIA H100 80GB HBM3"

#: random:llama3.2-1b on one H100: the GPU default of ``tandem bench``
LLAMA32_1B = StepTimeModel(
    "random:llama3.2-1b", H100,
    (DecodePoint(16384, 1.590, "2026-12-06_3d65e3d_TB_native.json"),
     DecodePoint(32863, 1.844, "2026-12-06_offline-64_llama3.2-1b_h100_755f55f.json"),
     DecodePoint(132210, 3.230, "2026-12-06_M_llama3.2-1b_h100_755f55f.json"),
     DecodePoint(542520, 10.347, "2026-12-06_M1024_llama3.2-1b_h100_755f55f.json")),
    prefill_ms_per_token=3.17e-3, prefill_source="2026-12-06_M_llama3.2-1b_h100_755f55f.json")

#: random:llama3-8b on one H100 (workload S)
LLAMA3_8B = StepTimeModel(
    "random:llama3-8b", H100,
    (DecodePoint(24576, 7.456, "2026-12-06_S_llama3-8b_h100_755f55f.json"),
     DecodePoint(32863, 8.080, "2026-11-23_O8B_64_llama3-8b_h100_b1291fc.json"),
     DecodePoint(132210, 14.145, "2026-11-23_O8B_256_llama3-8b_h100_b1291fc.json")),
    prefill_ms_per_token=24.5e-3, prefill_source="2026-12-06_S_llama3-8b_h100_755f55f.json")

STEP_TIME_MODELS = {m.model: m for m in (LLAMA32_1B, LLAMA3_8B)}


def step_time_model(model: str) -> StepTimeModel:
    """The measured model for a preset; a model without one gets the 1B's (said in the output)."""
    return STEP_TIME_MODELS.get(model, LLAMA32_1B)
