"""The step contract between the host and the device: one declarative list of per-step fields.

The batch builder fills each field as a flat array and packs them, in this order, into one int64
buffer (float32 fields ride along bit for bit, two to a word) so a step's inputs cross to the
device in a single copy; the worker unpacks the same list into tensor views. A new field is one
line here (plus, for a per-step field, the line in ``batch`` that computes it).

Sizes are per flat token, per sequence, per sequence + 1 (offsets), per sampled row, or the block
table (sequences x max_blocks)."""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.sampling_params import SamplingParams


class Per(enum.Enum):
    TOKEN = "token"
    SEQ = "seq"
    SEQ_EDGE = "seq + 1"
    SAMPLE = "sample"
    TABLE = "seq x max_blocks"


#: padding markers: continue counting one per padding row; the worker's padding row of next_tokens
COUNT, PADDING_ROW = "count", "padding_row"


@dataclass(frozen=True)
class StepField:
    name: str
    per: Per
    dtype: type  # np.int64 or np.float32
    pad: int | float | str  # value of a padding row (graph-padded decode steps), or a marker above
    #: per-request constant, read once when the request joins; None: computed per step by the builder
    from_request: Callable[[SamplingParams, int], int | float] | None = field(default=None, compare=False)
    doc: str = ""


def _seed(params: SamplingParams, seed: int) -> int:
    return seed


STEP_FIELDS: tuple[StepField, ...] = (
    StepField("input_ids", Per.TOKEN, np.int64, 0, doc="token ids; -(row + 1) where still pending on the device"),
    StepField("positions", Per.TOKEN, np.int64, 0),
    StepField("slot_mapping", Per.TOKEN, np.int64, 0, doc="KV cache slot each token's K/V goes to"),
    StepField("query_start", Per.SEQ_EDGE, np.int64, COUNT, doc="offset of each sequence's first token"),
    StepField("seq_lens", Per.SEQ, np.int64, 1, doc="context length including this step's tokens"),
    StepField("block_tables", Per.TABLE, np.int64, 0),
    StepField("logits_indices", Per.SAMPLE, np.int64, COUNT, doc="flat token whose logits are sampled"),
    StepField("sample_rows", Per.SAMPLE, np.int64, PADDING_ROW, doc="next-token table row each sample goes to"),
    StepField("gen_index", Per.SAMPLE, np.int64, 0, doc="output index of the sampled token (seeds its noise)"),
    StepField("seeds", Per.SAMPLE, np.int64, 0, from_request=_seed),
    StepField("top_k", Per.SAMPLE, np.int64, 0, from_request=lambda p, s: p.effective_top_k),
    StepField("temperature", Per.SAMPLE, np.float32, 0.0, from_request=lambda p, s: p.effective_temperature),
    StepField("top_p", Per.SAMPLE, np.float32, 1.0, from_request=lambda p, s: p.top_p),
    StepField("min_p", Per.SAMPLE, np.float32, 0.0, from_request=lambda p, s: p.min_p),
)
FIELDS_BY_NAME = {f.name: f for f in STEP_FIELDS}
INT_FIELDS = tuple(f for f in STEP_FIELDS if f.dtype is np.int64)
FLOAT_FIELDS = tuple(f for f in STEP_FIELDS if f.dtype is np.float32)
REQUEST_INT_FIELDS = tuple(f for f in INT_FIELDS if f.from_request is not None)
REQUEST_FLOAT_FIELDS = tuple(f for f in FLOAT_FIELDS if f.from_request is not None)


def request_values(params: SamplingParams, seed: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A request's constant per-sample fields (ints, floats), in field order; cached per request."""
    return (tuple(int(f.from_request(params, seed)) for f in REQUEST_INT_FIELDS),
            tuple(float(f.from_request(params, seed)) for f in REQUEST_FLOAT_FIELDS))


@dataclass(frozen=True)
class StepShape:
    num_tokens: int
    num_seqs: int
    num_sampled: int
    max_q: int  # longest query chunk of one sequence
    max_blocks: int  # block-table width

    def size(self, per: Per) -> int:
        return {Per.TOKEN: self.num_tokens, Per.SEQ: self.num_seqs, Per.SEQ_EDGE: self.num_seqs + 1,
                Per.SAMPLE: self.num_sampled, Per.TABLE: self.num_seqs * self.max_blocks}[per]

    @property
    def num_words(self) -> int:
        """Length of the packed buffer: int fields, then float fields two to a word."""
        ints = sum(self.size(f.per) for f in INT_FIELDS)
        return ints + -(-sum(self.size(f.per) for f in FLOAT_FIELDS) // 2)

    @property
    def is_decode(self) -> bool:
        return self.max_q == 1


@dataclass(frozen=True)
class SamplerFlags:
    """What the sampler must do this step; part of a graph's key, since each variant is its own graph."""

    any_random: bool  # some row samples (temperature > 0)
    need_sort: bool  # some random row uses top-k or top-p


@dataclass
class StepInputs:
    step_id: int
    shape: StepShape
    sampler: SamplerFlags
    data: np.ndarray  # int64 [shape.num_words]: every field packed, in STEP_FIELDS order


@dataclass
class StepOutput:
    """What the device returns for one step: one sampled token per sampled row, in schedule order."""

    step_id: int
    token_ids: list[int]


def pack(arrays: dict[str, np.ndarray], shape: StepShape) -> np.ndarray:
    """Concatenate every field (checked against its size) into the int64 step buffer."""
    parts = []
    for f in INT_FIELDS:
        parts.append(_checked(arrays[f.name], f, shape).astype(np.int64, copy=False))
    floats = np.concatenate([_checked(arrays[f.name], f, shape) for f in FLOAT_FIELDS]).astype(np.float32)
    if floats.size % 2:
        floats = np.append(floats, np.float32(0))
    parts.append(floats.view(np.int64))
    return np.concatenate(parts)


def _checked(a: Any, f: StepField, shape: StepShape) -> np.ndarray:
    a = np.asarray(a).ravel()
    if a.size != shape.size(f.per):
        raise AssertionError(f"step field {f.name} has {a.size} values, the shape needs {shape.size(f.per)}")
    return a


def field_offsets(shape: StepShape) -> dict[str, tuple[int, int]]:
    """(start, length) of each field in the packed buffer, counted in elements of its own dtype."""
    out: dict[str, tuple[int, int]] = {}
    offset = 0
    for f in INT_FIELDS:
        out[f.name] = (offset, shape.size(f.per))
        offset += shape.size(f.per)
    offset *= 2  # float32 elements from here on
    for f in FLOAT_FIELDS:
        out[f.name] = (offset, shape.size(f.per))
        offset += shape.size(f.per)
    return out
