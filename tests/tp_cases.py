"""Requests for tensor-parallel comparisons, shared by the CPU tests and scripts/tp_gpu_checks.py: six
prompts of 3 to 40 tokens (token ids below 445: every tiny checkpoint's vocabulary), greedy and seeded
sampling (temperature, top-p, top-k, min-p) in one batch, some ending on EOS and some ignoring it."""
from __future__ import annotations

from tandem.sampling_params import SamplingParams


def mixed_requests() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[(7 * i + 3 * j) % 440 + 5 for j in range(n)] for i, n in enumerate((5, 17, 40, 3, 26, 11))]
    params = [SamplingParams(temperature=0, max_tokens=20),
              SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=12, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=13, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    return prompts, params
