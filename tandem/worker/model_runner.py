"""The device side of one step: unpack inputs, resolve pending tokens, forward, sample.

Shared by every executor; it only enqueues device work (no host synchronisation), so the async
executor can run it on its own stream while the host prepares the next step."""
from __future__ import annotations

import torch

from tandem.engine.step import FLOAT_FIELDS, INT_FIELDS, SamplerFlags, StepShape, field_offsets
from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.llama import LlamaModel
from tandem.worker.sampler import SamplingTensors, sample


class StepTensors(dict):
    """Views of one step's packed buffer, one per field of the step contract (``tensors.input_ids``)."""

    __getattr__ = dict.__getitem__


def unpack(data: torch.Tensor, shape: StepShape) -> StepTensors:
    """Views of the packed int64 buffer (see ``tandem.engine.step``): int fields, then float32 fields."""
    offsets = field_offsets(shape)
    out = StepTensors()
    for f in INT_FIELDS:
        start, size = offsets[f.name]
        out[f.name] = data[start:start + size]
    floats = data[:shape.num_words].view(torch.float32)
    for f in FLOAT_FIELDS:
        start, size = offsets[f.name]
        out[f.name] = floats[start:start + size]
    return out


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, num_rows: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        # last token sampled for each sequence's row; the source of pending decode inputs
        self.next_tokens = torch.zeros(num_rows, dtype=torch.int64, device=self.device)

    def run(self, data: torch.Tensor, shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
        """data: the step's packed inputs already on the device -> sampled ids [num_sampled]."""
        f = unpack(data, shape)
        attn = step_attention(self.attention_inputs(f, shape))
        hidden = self.model.forward(self.resolve_pending(f.input_ids), f.positions, self.kv_cache, attn)
        return self.sample(hidden, f, shape, flags)

    def resolve_pending(self, ids: torch.Tensor) -> torch.Tensor:
        """Placeholders -(row + 1) -> the token the previous step sampled for that row."""
        return torch.where(ids < 0, self.next_tokens[(-ids - 1).clamp(min=0)], ids)

    def attention_inputs(self, f: StepTensors, shape: StepShape) -> AttentionInputs:
        return AttentionInputs(f.slot_mapping, f.block_tables.view(shape.num_seqs, shape.max_blocks), f.query_start,
                               f.seq_lens, f.positions, shape.max_q, self.block_size, self.model.scale,
                               self.model.config.sliding_window)

    def sample(self, hidden: torch.Tensor, f: StepTensors, shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
        """Logits of the sampled rows -> token ids, also written to the next-token table."""
        if shape.num_sampled == 0:
            return f.input_ids.new_empty(0)
        logits = self.model.compute_logits(hidden[f.logits_indices])
        tensors = SamplingTensors(f.temperature, f.top_k, f.top_p, f.min_p, f.seeds, f.gen_index,
                                  flags.any_random, flags.need_sort)
        tokens = sample(logits, tensors)
        self.next_tokens.index_copy_(0, f.sample_rows, tokens)
        return tokens
