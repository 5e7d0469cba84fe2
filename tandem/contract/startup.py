"""The synthetic steps a worker runs before it serves: it asks for them, the host builds them.

A worker's start-up runs steps no request made: the worst cases whose peak activation memory sizes
the KV cache, the decode steps CUDA graphs are captured from, and tiny steps that compile every
kernel variant before the first request. They must be steps the host's batch builder produces (the
same fields, padding and sampler flags), so the engine builds them (``engine.startup_steps``) and
the one place that chooses a worker (``tandem.runtime``) hands the builder to it. The worker decides
when, and with which sizes, since only it knows them (the model's vocabulary, the block-table width
that fits its KV cache)."""
from __future__ import annotations

from typing import Protocol

from tandem.contract.step import Padding, StepInputs


class StartupSteps(Protocol):
    def worst_eager(self, num_tokens: int, num_seqs: int, max_len: int, block_size: int,
                    vocab_size: int) -> StepInputs:
        """The largest eager step: ``num_tokens`` prefill tokens over ``num_seqs`` whole prompts (each
        within ``max_len``), every one sampled asking the most of the sampler, in blocks 1..n."""
    def graph_decode(self, pad: Padding, block_size: int, worst_sampling: bool = False) -> StepInputs:
        """A decode step of one sequence in reserved block 0, padded to ``pad``'s rows with its whole
        block table: what a decode graph is captured from (``worst_sampling``: the largest graph's
        profile, asking the most of the sampler)."""
    def warm_up(self, block_size: int, vocab_size: int) -> list[StepInputs]:
        """Tiny eager steps (blocks from 1, rows from 0) that together reach every kernel variant a
        step may need: the attention query tiles and the sampling stage's paths."""
