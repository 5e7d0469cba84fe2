"""The synthetic steps a worker runs at start-up, built here by the host's own batch builder so that
each is a step the scheduler could produce (the worker only runs them: ``contract.startup``).

- **The memory plan's worst cases.** The KV cache takes what remains after weights and activations,
  so the profiled steps must be the largest the scheduler can produce: an eager step with the most
  tokens spread over the most sequences, every sequence sampled with top-p, penalties and 20
  logprobs (the sampling stage's largest workspace), and the largest graph-captured decode step,
  whose memory stays reserved in the graph pool beside it. Attention memory is O(tokens) with the
  Triton kernels, so context lengths do not enlarge either.
- **Graph capture.** One decode step per captured batch size, with the graph's whole block table.
- **Kernel warm-up** (``WARM_UP_STEPS``): Triton compiles a kernel the first time it meets a new
  combination of its compile-time constants (and of its arguments' specialisations: see
  ``contract.step.field_offsets`` for the alignment of the step's fields); in the middle of serving
  that is a stall of a second or more for the whole batch. The profiled worst case and graph capture
  compile most variants; these few tiny eager steps compile the rest: the attention kernel's query
  tile sizes (short and long chunks) and the sampling stage's paths (top-k, top-p, min-p,
  penalties, logprobs, prompt logprobs).

Token ids are drawn from a fixed seed: every rank of a tensor-parallel group builds the same steps."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from tandem.contract.step import Padding, StepInputs
from tandem.engine.batch import build_step
from tandem.engine.plan import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.sampling_params import SamplingParams

# the most a request asks of the sampling stage: its workspace is part of the worst case
WORST_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, logprobs=20, repetition_penalty=1.1,
                                frequency_penalty=0.5)

#: (chunk lengths of one step, how every sequence of it samples); the chunk lengths span the query
#: tile sizes (tokens x query heads per KV head: 16, 32, 64 rows) for any GQA group
WARM_UP_STEPS: tuple[tuple[tuple[int, ...], SamplingParams], ...] = (
    ((2, 1), SamplingParams(temperature=1.0, top_k=20)),
    ((4, 3), SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5)),
    ((8, 1), SamplingParams(temperature=0.0, logprobs=3)),
    ((16, 2), SamplingParams(temperature=0.7, min_p=0.1, repetition_penalty=1.1, frequency_penalty=0.2)),
    ((32, 5), SamplingParams(temperature=1.0, top_k=5, top_p=0.8, logprobs=1)),
    ((64, 7), SamplingParams(temperature=0.0, prompt_logprobs=2)),
)


def synthetic_sequence(rid: str, num_tokens: int, vocab_size: int, params: SamplingParams, first_block: int,
                       block_size: int, rng: np.random.Generator) -> Sequence:
    """A prompt of random tokens in blocks ``first_block``.., in row 0."""
    seq = Sequence(rid, rng.integers(0, vocab_size, num_tokens).tolist(), params, seed=0, max_new_tokens=1)
    seq.block_ids = list(range(first_block, first_block + -(-num_tokens // block_size)))
    seq.row = 0
    return seq


def _prefill_step(sizes: list[int] | tuple[int, ...], params: SamplingParams, block_size: int, vocab_size: int,
                  rid: str, distinct_rows: bool = False) -> StepInputs:
    """Whole prompts of these lengths, each sampled with ``params``, in blocks 1..n (rows 0.. when
    ``distinct_rows``, else all row 0)."""
    rng = np.random.default_rng(0)
    items, block = [], 1
    for i, n in enumerate(sizes):
        seq = synthetic_sequence(f"{rid}-{i}", n, vocab_size, params, block, block_size, rng)
        seq.row = i if distinct_rows else 0
        block += len(seq.block_ids)
        item = ScheduledSeq(seq, 0, n, True, 0)
        if params.prompt_logprobs is not None:
            item.plp_stop = n - 1
        items.append(item)
    return build_step(SchedulerOutput(0, items), block_size)


def worst_eager_step(num_tokens: int, num_seqs: int, max_len: int, block_size: int, vocab_size: int) -> StepInputs:
    """``num_tokens`` prefill tokens over ``num_seqs`` sequences (each within ``max_len``), all sampled
    with top-p, in blocks 1..n."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    num_tokens = min(num_tokens, num_seqs * max_len)
    sizes = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    return _prefill_step(sizes, WORST_SAMPLING, block_size, vocab_size, "profile")


def decode_step(pad: Padding, block_size: int, params: SamplingParams | None = None) -> StepInputs:
    """A decode step of one sequence in reserved block 0, padded to ``pad.num_seqs`` rows (graph
    capture, and the profile of the largest graph with ``params`` asking the most of the sampler),
    with the graph's whole block table."""
    seq = Sequence("capture", [1], params or SamplingParams(temperature=0.0), seed=0, max_new_tokens=1)
    seq.block_ids, seq.row = [0], pad.padding_row
    return build_step(SchedulerOutput(-1, [ScheduledSeq(seq, 0, 1, True, 0)]), block_size,
                      replace(pad, full_table=True))


def warm_up_steps(block_size: int, vocab_size: int) -> list[StepInputs]:
    """``WARM_UP_STEPS`` as steps, each sequence in its own row."""
    return [_prefill_step(lens, params, block_size, vocab_size, "warm-up", distinct_rows=True)
            for lens, params in WARM_UP_STEPS]


class StartupStepBuilder:
    """The engine's ``StartupSteps`` (``contract.startup``). Holds nothing, so it pickles to its name:
    a tensor-parallel rank 0 hands it to the other ranks with the engine config."""

    def worst_eager(self, num_tokens: int, num_seqs: int, max_len: int, block_size: int,
                    vocab_size: int) -> StepInputs:
        return worst_eager_step(num_tokens, num_seqs, max_len, block_size, vocab_size)

    def graph_decode(self, pad: Padding, block_size: int, worst_sampling: bool = False) -> StepInputs:
        return decode_step(pad, block_size, WORST_SAMPLING if worst_sampling else None)

    def warm_up(self, block_size: int, vocab_size: int) -> list[StepInputs]:
        return warm_up_steps(block_size, vocab_size)
