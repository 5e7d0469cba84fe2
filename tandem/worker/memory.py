"""The memory plan's measurement: the peak activation memory of the worst-case steps, which the KV
cache must leave room for.

The steps themselves are the host's (``contract.startup``: the largest eager step the scheduler can
produce, and the largest graph-captured decode step, whose memory stays reserved in the graph pool
beside it); here each runs once on a private runner with a KV cache just big enough for it.

A mixture-of-experts model's worst step also holds the fused MoE kernel's workspace (its
per-slot activations and outputs and the expert alignment, ``moe_align.workspace_bytes``): the
measured peak includes it, and the plan never reserves less than it for the eager step, whichever
experts path the profiled step took. The plan adds the largest grammar mask a step can carry
(structured output), which the profiled steps do not."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.contract.startup import StartupSteps
from tandem.contract.step import Padding, StepInputs, field_offsets
from tandem.kernels.moe_align import workspace_bytes
from tandem.model.base import CausalLM
from tandem.model.model_config import ModelConfig
from tandem.model.moe_shape import moe_shape
from tandem.worker.kv_cache import allocate_kv_cache
from tandem.worker.model_runner import ModelRunner


def blocks_used(step: StepInputs) -> int:
    """Blocks the step's sequences hold (its block tables), plus the reserved block 0."""
    start, size = field_offsets(step.shape)["block_tables"]
    return int(step.data[start:start + size].max()) + 1


@dataclass(frozen=True)
class ActivationPeaks:
    eager_bytes: int  # the worst eager step, beyond what was allocated before it
    graph_bytes: int  # the largest graph-captured steps: decode, and piecewise (0 without graphs)

    @property
    def total(self) -> int:
        return self.eager_bytes + self.graph_bytes


def _peak_bytes(model: CausalLM, step: StepInputs, block_size: int, max_len: int) -> int:
    device = model.device
    cache = allocate_kv_cache(model.kv_spec, blocks_used(step), block_size, device, model.dtype)
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


def moe_workspace_bytes(cfg: ModelConfig, max_tokens: int, dtype: torch.dtype) -> int:
    """The fused MoE kernel's workspace for a step of ``max_tokens`` tokens (0 for a dense model)."""
    shape = moe_shape(cfg)
    if shape is None:
        return 0
    return workspace_bytes(max_tokens, shape.top_k, shape.num_experts, shape.hidden_size, shape.expert_intermediate,
                           torch.empty(0, dtype=dtype).element_size())


def profile_activations(model: CausalLM, steps: StartupSteps, max_tokens: int, max_seqs: int, max_len: int,
                        block_size: int, graph_max_blocks: int | None, piecewise_tokens: int = 0) -> ActivationPeaks:
    """Peak activation bytes of the worst eager step and of the largest graph-captured steps (their
    pool stays reserved beside eager steps' memory)."""
    vocab = model.config.vocab_size  # the whole vocabulary on every rank: token ids are global
    eager = steps.worst_eager(max_tokens, max_seqs, max_len, block_size, vocab)
    graph = 0
    if graph_max_blocks is not None:
        pad = Padding(max_seqs, max_seqs, graph_max_blocks, padding_row=0)
        graph = _peak_bytes(model, steps.graph_decode(pad, block_size, worst_sampling=True), block_size, max_len)
    if piecewise_tokens:
        piecewise = steps.worst_eager(piecewise_tokens, max_seqs, max_len, block_size, vocab)
        graph += _peak_bytes(model, piecewise, block_size, max_len)
    eager_peak = max(_peak_bytes(model, eager, block_size, max_len),
                     moe_workspace_bytes(model.config, max_tokens, model.dtype))
    return ActivationPeaks(eager_peak + grammar_mask_bytes(max_seqs, vocab), graph)


def grammar_mask_bytes(max_seqs: int, vocab: int) -> int:
    """A step's grammar mask on the device (structured output: one int32 word per 32 tokens of each
    sampled row), copied in beside the step's logits; the profiled steps carry none."""
    return max_seqs * -(-vocab // 32) * 4
