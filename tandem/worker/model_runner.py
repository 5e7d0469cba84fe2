"""The device side of one step: unpack inputs, resolve pending tokens, forward, then the sampling
stage (history, penalties and logit bias, sampling, logprobs) and the packed output.

Shared by every executor; it only enqueues device work (no host synchronisation), so the async
executor can run it on its own stream while the host prepares the next step. A captured graph
covers ``forward_logits``; ``finish`` runs after it eagerly, so the variable-length per-step lists
(logit bias, prompt logprobs) and the optional stages cost nothing when a step does not use them."""
from __future__ import annotations

import torch

from tandem.engine.step import FLOAT_FIELDS, INT_FIELDS, SamplerFlags, StepShape, field_offsets, output_layout
from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.llama import LlamaModel
from tandem.worker.logits_processing import apply_logit_bias, apply_penalties, record_history
from tandem.worker.logprobs import token_logprobs
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


def pack_output(parts: dict[str, torch.Tensor], shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
    """The step's returned fields in ``output_layout`` order, as one int64 buffer."""
    ints, floats = output_layout(shape, flags)
    words = [parts[p.name].reshape(-1).to(torch.int64) for p in ints]
    if floats:
        f32 = torch.cat([parts[p.name].reshape(-1).to(torch.float32) for p in floats])
        if f32.numel() % 2:
            f32 = torch.cat([f32, f32.new_zeros(1)])
        words.append(f32.view(torch.int64))
    return torch.cat(words)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, num_rows: int,
                 max_model_len: int | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        # last token sampled for each sequence's row; the source of pending decode inputs
        self.next_tokens = torch.zeros(num_rows, dtype=torch.int64, device=self.device)
        # every token of each row's sequence by position, for penalties (the last row takes padding)
        width = max_model_len or model.max_positions
        self.history = torch.zeros(num_rows, width, dtype=torch.int32, device=self.device)

    def run(self, data: torch.Tensor, shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
        """data: the step's packed inputs already on the device -> the packed output (see ``finish``)."""
        f = unpack(data, shape)
        ids = self.resolve_pending(f.input_ids)
        hidden = self.model.forward(ids, f.positions, self.kv_cache, step_attention(self.attention_inputs(f, shape)))
        return self.finish(hidden, ids, f, shape, flags)

    def forward_logits(self, data: torch.Tensor, shape: StepShape) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of a decode step a CUDA graph captures: logits of the sampled rows, resolved ids."""
        f = unpack(data, shape)
        ids = self.resolve_pending(f.input_ids)
        hidden = self.model.forward(ids, f.positions, self.kv_cache, step_attention(self.attention_inputs(f, shape)))
        return self.model.compute_logits(hidden[f.logits_indices]), ids

    def resolve_pending(self, ids: torch.Tensor) -> torch.Tensor:
        """Placeholders -(row + 1) -> the token the previous step sampled for that row."""
        return torch.where(ids < 0, self.next_tokens[(-ids - 1).clamp(min=0)], ids)

    def attention_inputs(self, f: StepTensors, shape: StepShape) -> AttentionInputs:
        return AttentionInputs(f.slot_mapping, f.block_tables.view(shape.num_seqs, shape.max_blocks), f.query_start,
                               f.seq_lens, f.positions, shape.max_q, self.block_size, self.model.scale,
                               self.model.config.sliding_window)

    def finish(self, hidden: torch.Tensor, ids: torch.Tensor, f: StepTensors, shape: StepShape,
               flags: SamplerFlags, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The sampling stage after the forward: record the step's tokens, process and sample the
        logits (``hidden[logits_indices]``, unless given), logprobs, and pack what returns."""
        record_history(self.history, ids, f.positions, f.query_start, f.seq_rows)
        if shape.num_history:
            self.history[f.history_row, f.history_pos] = f.history_token.to(self.history.dtype)
        if logits is None:
            logits = self.model.compute_logits(hidden[f.logits_indices])
        parts: dict[str, torch.Tensor] = {}
        if shape.num_sampled:
            logits = self._process(logits, f, shape, flags)
            tokens = sample(logits, SamplingTensors(f.temperature, f.top_k, f.top_p, f.min_p, f.seeds,
                                                    f.gen_index, flags.any_random, flags.need_sort))
            self.next_tokens.index_copy_(0, f.sample_rows, tokens)
            parts["token_ids"] = tokens
            if flags.logprobs >= 0:
                parts.update(token_logprobs(logits, tokens, flags.logprobs))
        else:
            parts["token_ids"] = ids.new_empty(0)
        if flags.prompt_logprobs >= 0 and shape.num_prompt_logprobs:
            prompt_logits = self.model.compute_logits(hidden[f.prompt_logprob_index])
            found = token_logprobs(prompt_logits, f.prompt_logprob_target, flags.prompt_logprobs)
            parts.update({"prompt_" + name: value for name, value in found.items()})
        return pack_output(parts, shape, flags)

    def _process(self, logits: torch.Tensor, f: StepTensors, shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
        if not flags.penalties and not shape.num_bias:
            return logits
        logits = logits.float() if logits.dtype != torch.float64 else logits.clone()
        if flags.penalties:
            apply_penalties(logits, self.history, f.sample_rows, f.prompt_lens, f.gen_index, f.presence_penalty,
                            f.frequency_penalty, f.repetition_penalty, flags.penalty_span)
        if shape.num_bias:
            apply_logit_bias(logits, f.bias_sample, f.bias_token, f.bias_value)
        return logits
