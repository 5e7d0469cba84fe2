"""The device side of one step: unpack inputs, resolve pending tokens, forward, sample.

Shared by every executor; it only enqueues device work (no host synchronisation), so the async
executor can run it on its own stream while the host prepares the next step."""
from __future__ import annotations

import torch

from tandem.engine.batch import FLOAT_FIELDS, INT_FIELDS, StepInputs, StepShape
from tandem.engine.sampler import SamplingTensors, sample
from tandem.model.attention import AttentionMetadata, build_mask, uses_decode_kernel
from tandem.model.llama import LlamaModel


def unpack(data: torch.Tensor, shape: StepShape) -> dict[str, torch.Tensor]:
    """Views of the packed int64 buffer (see ``batch``): int fields, then float32 fields."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, size in shape.int_sizes().items():
        out[name] = data[offset:offset + size]
        offset += size
    floats = data[offset:shape.num_words].view(torch.float32)
    s = shape.num_sampled
    for i, name in enumerate(FLOAT_FIELDS):
        out[name] = floats[i * s:(i + 1) * s]
    return out


assert tuple(StepShape(1, 1, 1, 1, 1).int_sizes()) == INT_FIELDS  # packing order is one contract


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, num_slots: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        # last token sampled for each sequence slot; the source of pending decode inputs
        self.next_tokens = torch.zeros(num_slots, dtype=torch.int64, device=self.device)

    def run(self, data: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """data: the step's packed inputs already on the device -> sampled ids [S]."""
        shape = step.shape
        f = unpack(data, shape)
        ids = f["input_ids"]
        ids = torch.where(ids < 0, self.next_tokens[(-ids - 1).clamp(min=0)], ids)
        window = self.model.config.sliding_window
        mask = None if uses_decode_kernel(shape.max_q, self.device) else build_mask(
            f["q_positions"].view(shape.num_seqs, shape.max_q), f["seq_lens_k"], shape.max_blocks * self.block_size,
            window)
        meta = AttentionMetadata(f["slot_mapping"], f["block_tables"].view(shape.num_seqs, shape.max_blocks),
                                 f["token_batch"], f["token_row"], mask, shape.max_q, f["seq_lens_k"], window)
        hidden = self.model.forward(ids, f["positions"], self.kv_cache, meta, self.block_size)
        if shape.num_sampled == 0:
            return ids.new_empty(0)
        logits = self.model.compute_logits(hidden[f["logits_indices"]])
        tensors = SamplingTensors(f["temperature"], f["top_k"], f["top_p"], f["min_p"], f["seeds"],
                                  f["gen_index"], step.any_random, step.need_sort)
        tokens = sample(logits, tensors)
        self.next_tokens.index_copy_(0, f["sample_slots"], tokens)
        return tokens
