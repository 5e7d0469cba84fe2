"""Synthetic steps for start-up: the worst cases whose peak activation memory sizes the KV cache,
and the decode steps that CUDA graphs are captured from.

The KV cache takes what remains after weights and activations, so the profiled steps must be the
largest the scheduler can produce: an eager step with the most tokens spread over the most
sequences, every sequence sampled with top-p, penalties and 20 logprobs (the sampling stage's
largest workspace), and the largest
graph-captured decode step, whose memory stays reserved in the graph pool beside it. Attention
memory is O(tokens) with the Triton kernels, so context lengths do not enlarge either."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tandem.engine.batch import Padding, build_step
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.engine.step import StepInputs, field_offsets
from tandem.model.base import CausalLM
from tandem.sampling_params import SamplingParams
from tandem.worker.kv_cache import allocate_kv_cache
from tandem.worker.model_runner import ModelRunner

# the most a request asks of the sampling stage: its workspace is part of the worst case
_WORST_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, logprobs=20, repetition_penalty=1.1,
                                 frequency_penalty=0.5)


def synthetic_sequence(rid: str, num_tokens: int, vocab_size: int, params: SamplingParams, first_block: int,
                       block_size: int) -> Sequence:
    ids = torch.randint(0, vocab_size, (num_tokens,)).tolist()
    seq = Sequence(rid, ids, params, seed=0, max_new_tokens=1)
    seq.block_ids = list(range(first_block, first_block + -(-num_tokens // block_size)))
    seq.row = 0
    return seq


def worst_eager_step(num_tokens: int, num_seqs: int, max_len: int, block_size: int, vocab_size: int) -> StepInputs:
    """``num_tokens`` prefill tokens over ``num_seqs`` sequences (each within ``max_len``), all sampled
    with top-p, in blocks 1..n."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    num_tokens = min(num_tokens, num_seqs * max_len)
    sizes = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    items, block = [], 1
    for i, n in enumerate(sizes):
        seq = synthetic_sequence(f"profile-{i}", n, vocab_size, _WORST_SAMPLING, block, block_size)
        block += len(seq.block_ids)
        items.append(ScheduledSeq(seq, 0, n, True, 0))
    return build_step(SchedulerOutput(0, items), block_size)


def _blocks_used(step: StepInputs) -> int:
    """Blocks the step's sequences hold (its block tables), plus the reserved block 0."""
    start, size = field_offsets(step.shape)["block_tables"]
    return int(step.data[start:start + size].max()) + 1


def decode_step(pad: Padding, block_size: int, params: SamplingParams | None = None) -> StepInputs:
    """A decode step of one sequence in reserved block 0, padded to ``pad.num_seqs`` rows (graph
    capture, and the profile of the largest graph with ``params`` asking the most of the sampler),
    with the graph's whole block table."""
    seq = Sequence("capture", [1], params or SamplingParams(temperature=0.0), seed=0, max_new_tokens=1)
    seq.block_ids, seq.row = [0], pad.padding_row
    return build_step(SchedulerOutput(-1, [ScheduledSeq(seq, 0, 1, True, 0)]), block_size,
                      replace(pad, full_table=True))


@dataclass(frozen=True)
class ActivationPeaks:
    eager_bytes: int  # the worst eager step, beyond what was allocated before it
    graph_bytes: int  # the largest graph-captured steps: decode, and piecewise (0 without graphs)

    @property
    def total(self) -> int:
        return self.eager_bytes + self.graph_bytes


def _peak_bytes(model: CausalLM, step: StepInputs, block_size: int, max_len: int) -> int:
    device = model.device
    cache = allocate_kv_cache(model.kv_spec, _blocks_used(step), block_size, device, model.dtype)
    runner = ModelRunner(model, cache, block_size, step.shape.num_sampled + 1, max_len)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.run(torch.from_numpy(step.data).to(device), step.shape, step.sampler)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del cache, runner
    torch.cuda.empty_cache()
    return peak


def profile_activations(model: CausalLM, max_tokens: int, max_seqs: int, max_len: int, block_size: int,
                        graph_max_blocks: int | None, piecewise_tokens: int = 0) -> ActivationPeaks:
    """Peak activation bytes of the worst eager step and of the largest graph-captured steps (their
    pool stays reserved beside eager steps' memory)."""
    vocab = model.config.vocab_size  # the whole vocabulary on every rank: token ids are global
    eager = worst_eager_step(max_tokens, max_seqs, max_len, block_size, vocab)
    graph = 0
    if graph_max_blocks is not None:
        pad = Padding(max_seqs, max_seqs, graph_max_blocks, padding_row=0)
        graph = _peak_bytes(model, decode_step(pad, block_size, _WORST_SAMPLING), block_size, max_len)
    if piecewise_tokens:
        piecewise = worst_eager_step(piecewise_tokens, max_seqs, max_len, block_size, vocab)
        graph += _peak_bytes(model, piecewise, block_size, max_len)
    return ActivationPeaks(_peak_bytes(model, eager, block_size, max_len), graph)
