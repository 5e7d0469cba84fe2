"""The device side of one step: unpack inputs, resolve pending tokens, forward, then the sampling
stage (history, penalties and logit bias, the grammar mask, sampling, logprobs) and the packed output.

Shared by every executor; it only enqueues device work (no host synchronisation), so the async
executor can run it on its own stream while the host prepares the next step. A captured graph
covers ``forward_logits``; ``finish`` runs after it eagerly, so the variable-length per-step lists
(logit bias, prompt logprobs) and the optional stages cost nothing when a step does not use them."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from tandem.contract.step import (FIELDS_BY_NAME, FLOAT_FIELDS, INT_FIELDS, Per, SamplerFlags, StepShape,
                                  field_offsets, output_layout)
from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.base import CausalLM
from tandem.worker.grammar_mask import apply_grammar_mask
from tandem.worker.logits_processing import apply_logit_bias, apply_penalties, record_history
from tandem.worker.logprobs import token_logprobs
from tandem.worker.sampler import SamplingTensors, sample
from tandem.worker.spec_lag import SpecLag


class StepTensors(dict):
    """Views of one step's packed buffer by field of the step contract (``tensors.input_ids``).

    A field not given up front becomes a view on first use: the graph path reads a handful of
    fields per step, and every view is a torch call the host pays for."""

    def __init__(self, data: torch.Tensor, shape: StepShape, views: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(views or {})
        self._data, self._shape, self._floats = data, shape, None

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        view = self.get(name)
        if view is None:
            view = self[name] = self._view(name)
        return view

    def _view(self, name: str) -> torch.Tensor:
        offsets = _offsets(self._shape)
        if name not in offsets:
            raise AttributeError(name)
        start, size = offsets[name]
        if FIELDS_BY_NAME[name].dtype is np.int64:
            return self._data[start:start + size]
        if self._floats is None:
            self._floats = self._data[:self._shape.num_words].view(torch.float32)
        return self._floats[start:start + size]


# step shapes repeat (graph sizes, steady decode batches): their offsets are computed once
_offsets = functools.lru_cache(maxsize=1024)(field_offsets)
_VARIABLE_FIELDS = tuple(f.name for f in INT_FIELDS + FLOAT_FIELDS
                         if f.per in (Per.BIAS, Per.PROMPT_LOGPROB, Per.HISTORY, Per.MASK))


def unpack(data: torch.Tensor, shape: StepShape) -> StepTensors:
    """Views of every field of the packed int64 buffer (see ``tandem.contract.step``): int fields,
    then float32 fields."""
    out = StepTensors(data, shape)
    for f in INT_FIELDS + FLOAT_FIELDS:
        getattr(out, f.name)
    return out


def has_lists(shape: StepShape) -> bool:
    """Whether the step has entries in a variable-length list (which also moves the float fields)."""
    return bool(shape.num_bias or shape.num_prompt_logprobs or shape.num_history or shape.num_masked)


class GraphFields:
    """The fields of a captured decode graph's static input buffer, as views made once.

    Every step a graph replays has the graph's shape, so its fixed-size int fields (all the graph
    reads) sit at the same offsets; the float fields and the variable-length lists move with the
    lists' lengths. A step's whole buffer is staged into the static one (which has room to spare
    for lists) and its views are kept per step shape: a steady decode batch repeats its shape, so
    its steps make no views at all. A step too large for the static buffer stages only the fixed
    ints and takes the rest from its own buffer, one view per field it uses.

    A step's block table may be narrower than the graph's (``batch.table_width``): it is staged into
    the first columns of the graph's table, behind the fields before it, which sit at the graph's
    offsets (the table is the last fixed field); the graph's kernels read a sequence's columns only
    up to its length, so the columns beyond keep whatever an earlier step left there, unread. The
    sampling stage then reads the other fields from the step's own buffer."""

    _MAX_SHAPES = 64  # shapes whose views are kept (bias-list lengths vary; the cache is cleared when full)

    def __init__(self, static: torch.Tensor, shape: StepShape) -> None:
        assert not has_lists(shape)
        self.static = static  # shared by the graphs; each reads its prefix
        self.capture_shape, self.capture = shape, unpack(static, shape)
        self.ints = {f.name: self.capture[f.name] for f in INT_FIELDS if f.name not in _VARIABLE_FIELDS}
        offsets = _offsets(shape)  # where the last fixed int field ends (fields start aligned)
        self.int_words = max(offsets[name][0] + offsets[name][1] for name in self.ints)
        assert sum(offsets["block_tables"]) == self.int_words, "the block table is the last fixed field"
        self.table = self.capture.block_tables.view(shape.num_seqs, shape.max_blocks)
        # per step shape: the staged prefix of the static buffer, and the fields' views into it
        self.views: dict[StepShape, tuple[torch.Tensor, StepTensors]] = {shape: (static[:shape.num_words], self.capture)}
        # steps with a narrower table, per (shape, buffer): views of that buffer
        self.narrow: dict[tuple[StepShape, int], StepTensors] = {}

    def stage(self, data: torch.Tensor, shape: StepShape) -> StepTensors:
        """Copy the step's inputs into the static buffer (on the current stream) -> its fields."""
        if shape.max_blocks != self.capture_shape.max_blocks:
            return self._stage_narrow(data, shape)
        if shape.num_words > self.static.numel():
            self.static[:self.int_words].copy_(data[:self.int_words])
            return StepTensors(data, shape, self.ints)
        cached = self.views.get(shape)
        if cached is None:
            if len(self.views) >= self._MAX_SHAPES:
                self.views = {self.capture_shape: self.views[self.capture_shape]}
            cached = self.views[shape] = (self.static[:shape.num_words], StepTensors(self.static, shape, self.ints))
        cached[0].copy_(data)
        return cached[1]

    def _stage_narrow(self, data: torch.Tensor, shape: StepShape) -> StepTensors:
        """A step that ``fits_graph``: the fields before its table sit at the graph's offsets."""
        start, size = _offsets(shape)["block_tables"]
        self.static[:start].copy_(data[:start])
        self.table[:, :shape.max_blocks].copy_(data[start:start + size].view(shape.num_seqs, shape.max_blocks))
        # ``data`` is one of the executor's input buffers (a few, reused): their views are kept
        key = (shape, data.data_ptr())
        views = self.narrow.get(key)
        if views is None:
            if len(self.narrow) >= self._MAX_SHAPES:
                self.narrow.clear()
            views = self.narrow[key] = StepTensors(data, shape)
        return views


def pack_output(parts: dict[str, torch.Tensor], shape: StepShape, flags: SamplerFlags) -> torch.Tensor:
    """The step's returned fields in ``output_layout`` order, as one int64 buffer."""
    ints, floats = output_layout(shape, flags)
    if not floats and len(ints) == 1:  # only the sampled ids: already the buffer
        return parts["token_ids"]
    words = [_flat(parts[p.name], torch.int64) for p in ints]
    f32 = [_flat(parts[p.name], torch.float32) for p in floats]
    if f32:
        if sum(p.rows * p.cols for p in floats) % 2:
            f32.append(f32[0].new_zeros(1))
        words.append(torch.cat(f32).view(torch.int64))
    return torch.cat(words)


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # no call at all for what is already flat and of its dtype (the usual case)
    t = t if t.dim() == 1 else t.reshape(-1)
    return t if t.dtype == dtype else t.to(dtype)


@dataclass
class Forwarded:
    """A step between its forward and its sampling stage (``ModelRunner.finish_forwarded``): a step
    with grammar-constrained rows waits here for its mask."""

    hidden: torch.Tensor | None  # None where a graph computed the sampled rows' ``logits`` itself
    ids: torch.Tensor  # resolved input ids
    fields: StepTensors
    logits: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int, num_rows: int,
                 max_model_len: int, speculative: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        # last token sampled for each sequence's row; the source of pending decode inputs
        self.next_tokens = torch.zeros(num_rows, dtype=torch.int64, device=self.device)
        # every token of each row's sequence by position, for penalties (the last row takes padding)
        self.history = torch.zeros(num_rows, max_model_len, dtype=torch.int32, device=self.device)
        # speculative decoding: what a speculating step accepted, for the next step (overlap)
        self.spec_lag = SpecLag(num_rows, self.device) if speculative else None
        # a draft model's proposals, made as a step's first op (``worker.draft_window.DeviceDraft``,
        # set by the worker; not imported here: the draft's graphs import this module)
        self.draft = None

    @staticmethod
    def state_bytes(num_rows: int, max_model_len: int, speculative: bool = False) -> int:
        """Device memory of the per-row state above (the KV cache plan leaves room for it: 1 GiB at
        1024 sequences of a 128K-token model)."""
        return num_rows * (8 + 4 * max_model_len + (SpecLag.ROW_BYTES if speculative else 0))

    def run(self, data: torch.Tensor, shape: StepShape, flags: SamplerFlags,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """data: the step's packed inputs already on the device -> the packed output (see ``finish``)."""
        return self.finish_forwarded(self.forward(data, shape), shape, flags, mask)

    def resolve_lagged(self, data: torch.Tensor, shape: StepShape) -> torch.Tensor:
        """The step's inputs as the device completes them before its forward: the sequences after a
        speculating step in flight shifted back (``worker.spec_lag``), then a draft model's proposals
        written in (``worker.draft_window``): a copy when there is either, else ``data`` itself. The
        first op of every path (eager, piecewise graphs, decode graphs: before their inputs are staged)."""
        if not shape.num_lagged and not shape.draft_rows:
            return data
        out = data.clone()
        f = StepTensors(out, shape)
        if shape.num_lagged:
            self.spec_lag.resolve(f, shape, self.block_size)
        if shape.draft_rows:  # after the shift: the window ends at the resolved first position
            self.draft.propose(f, out, shape.num_words, shape.draft, self.resolve_pending, self.spec_lag.draws)
        return out[:shape.num_words]

    def forward(self, data: torch.Tensor, shape: StepShape, resolved: bool = False) -> Forwarded:
        """The step up to its sampling stage, eagerly (``resolved``: ``resolve_lagged`` ran already)."""
        f = StepTensors(data if resolved else self.resolve_lagged(data, shape), shape)
        ids = self.resolve_pending(f.input_ids)
        hidden = self.model.forward(ids, f.positions, self.kv_cache, step_attention(self.attention_inputs(f, shape)))
        return Forwarded(hidden, ids, f)

    def finish_forwarded(self, fw: Forwarded, shape: StepShape, flags: SamplerFlags,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(fw.hidden, fw.ids, fw.fields, shape, flags, fw.logits, mask)

    def forward_logits(self, data: torch.Tensor, shape: StepShape,
                       logits_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of a decode step a CUDA graph captures: logits of the sampled rows (into
        ``logits_out`` when given), resolved ids."""
        f = unpack(data, shape)
        ids = self.resolve_pending(f.input_ids)
        hidden = self.model.forward(ids, f.positions, self.kv_cache, step_attention(self.attention_inputs(f, shape)))
        return self.model.compute_logits(hidden[f.logits_indices], logits_out), ids

    def resolve_pending(self, ids: torch.Tensor) -> torch.Tensor:
        """Placeholders -(row + 1) -> the token the previous step sampled for that row."""
        return torch.where(ids < 0, self.next_tokens[(-ids - 1).clamp(min=0)], ids)

    def attention_inputs(self, f: StepTensors, shape: StepShape) -> AttentionInputs:
        return AttentionInputs(f.slot_mapping, f.block_tables.view(shape.num_seqs, shape.max_blocks), f.query_start,
                               f.seq_lens, f.positions, shape.max_q, self.block_size)

    def finish(self, hidden: torch.Tensor, ids: torch.Tensor, f: StepTensors, shape: StepShape,
               flags: SamplerFlags, logits: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sampling stage after the forward: record the step's tokens, process and sample the
        logits (``hidden[logits_indices]``, unless given), logprobs, and pack what returns.
        ``mask``: the grammar bitmask of the rows ``mask_sample`` (None: sample them unconstrained,
        only for a step whose tokens are dropped, see ``Worker.drain``)."""
        # the history serves penalised rows only: record it when a sampled row is penalised or some
        # sequence samples nothing (a prefill chunk of a penalised request may be among them; with
        # speculation a step may sample as many rows as it has sequences and still hold one)
        if flags.penalties or flags.unsampled or shape.num_sampled < shape.num_seqs:
            record_history(self.history, ids, f.positions, f.query_start, f.seq_rows)
        if shape.num_history:
            self.history[f.history_row, f.history_pos] = f.history_token.to(self.history.dtype)
        if logits is None:
            logits = self.model.compute_logits(hidden[f.logits_indices])
        parts: dict[str, torch.Tensor] = {}
        if shape.num_sampled:
            logits = self._process(logits, f, shape, flags, mask)
            tokens = sample(logits, SamplingTensors(f.temperature, f.top_k, f.top_p, f.min_p, f.seeds,
                                                    f.gen_index, flags.any_random, flags.need_sort))
            if flags.speculative:  # the accepted run's last draw, and what the next step resolves from
                self.spec_lag.record(self.next_tokens, tokens, f.sample_rows, f.draft_token)
            else:
                self.next_tokens.index_copy_(0, f.sample_rows, tokens)
            parts["token_ids"] = tokens
            if shape.draft_rows:  # the proposals the draft made: the host's counters need them
                parts["draft_token"] = f.draft_token
            if flags.logprobs >= 0:
                parts.update(token_logprobs(logits, tokens, flags.logprobs))
        else:
            parts["token_ids"] = ids.new_empty(0)
        if flags.prompt_logprobs >= 0 and shape.num_prompt_logprobs:
            prompt_logits = self.model.compute_logits(hidden[f.prompt_logprob_index])
            found = token_logprobs(prompt_logits, f.prompt_logprob_target, flags.prompt_logprobs)
            parts.update({"prompt_" + name: value for name, value in found.items()})
        return pack_output(parts, shape, flags)

    def _process(self, logits: torch.Tensor, f: StepTensors, shape: StepShape, flags: SamplerFlags,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if flags.penalties or shape.num_bias:
            logits = logits.float() if logits.dtype != torch.float64 else logits.clone()
            if flags.penalties:
                apply_penalties(logits, self.history, f.sample_rows, f.prompt_lens, f.gen_index, f.presence_penalty,
                                f.frequency_penalty, f.repetition_penalty, flags.penalty_span)
            if shape.num_bias:
                apply_logit_bias(logits, f.bias_sample, f.bias_token, f.bias_value, flags.allowed_tokens)
        if mask is not None:  # last: in place (the logits of this step alone, or a graph's output buffer)
            apply_grammar_mask(logits, f.mask_sample, mask)
        return logits
