"""The step contract between the host and the device: one declarative list of per-step fields.

The batch builder (``engine.batch``) fills each field as a flat array and packs them, in this
order, into one int64 buffer (float32 fields ride along bit for bit, two to a word) so a step's
inputs cross to the device in a single copy; the worker unpacks the same list into tensor views. A
new field is one line here (plus, for a per-step field, the line in ``engine.batch`` that computes
it).

Sizes are per flat token, per sequence, per sequence + 1 (offsets), per sampled row (a sequence has
0 or 1, or, speculating, one per position it verifies: docs/pipeline.md), the block
table (sequences x max_blocks), or one of four variable-length lists: logit-bias entries (a request's
``logit_bias``, and the stop ids it may not yet sample under ``min_tokens``), prompt-logprob
entries, history entries (the tokens a penalised request found in the prefix cache, which no
step computes, so the device's token history learns them this way), and grammar-mask rows (the
sampled rows structured output constrains; the bitmask itself follows the step, see
``contract.worker.Worker.provide_mask``). The variable-length fields
come last among the ints and the floats, so a captured graph, which reads only the fixed-size int
fields, finds them at the same offsets; the block table is the last of those, so a step that ships a
narrower table than the graph's (only the columns its longest sequence uses) still has every other
fixed field where the graph reads it.

The step's output comes back the same way: ``output_layout`` says where each returned field sits
in the one int64 buffer the device copies back."""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from tandem.contract.draft import DraftShape
from tandem.sampling_params import SamplingParams


class Per(enum.Enum):
    TOKEN = "token"
    SEQ = "seq"
    SEQ_EDGE = "seq + 1"
    SAMPLE = "sample"
    TABLE = "seq x max_blocks"
    BIAS = "logit-bias entry"
    PROMPT_LOGPROB = "prompt-logprob entry"
    HISTORY = "history entry"
    MASK = "grammar-mask row"


class RequestLike(Protocol):
    """What a per-request field reads (a ``Sequence``)."""

    params: SamplingParams
    seed: int
    prompt_len: int


#: padding markers: continue counting one per padding row; the worker's padding row of next_tokens
COUNT, PADDING_ROW = "count", "padding_row"


@dataclass(frozen=True)
class StepField:
    name: str
    per: Per
    dtype: type  # np.int64 or np.float32
    pad: int | float | str  # value of a padding row (graph-padded decode steps), or a marker above
    #: per-request constant, read once when the request joins; None: computed per step by the builder
    from_request: Callable[[RequestLike], int | float] | None = field(default=None, compare=False)
    doc: str = ""


STEP_FIELDS: tuple[StepField, ...] = (
    StepField("input_ids", Per.TOKEN, np.int64, 0, doc="token ids; -(row + 1) where still pending on the device"),
    StepField("positions", Per.TOKEN, np.int64, 0),
    StepField("slot_mapping", Per.TOKEN, np.int64, 0, doc="KV cache slot each token's K/V goes to"),
    StepField("query_start", Per.SEQ_EDGE, np.int64, COUNT, doc="offset of each sequence's first token"),
    StepField("seq_lens", Per.SEQ, np.int64, 1, doc="context length including this step's tokens"),
    StepField("seq_rows", Per.SEQ, np.int64, PADDING_ROW, doc="each sequence's row of the per-row device state"),
    # speculative decoding overlapped (docs/pipeline.md): the host plans a step before the previous
    # one, which verified proposals for this sequence, is processed; it assumed every proposal accepted
    StepField("spec_lag", Per.SEQ, np.int64, 0,
              doc="1: the previous step verified proposals for it; positions, slots, length and output indices "
                  "shift back on the device by the proposals it rejected"),
    StepField("logits_indices", Per.SAMPLE, np.int64, COUNT, doc="flat token whose logits are sampled"),
    StepField("sample_rows", Per.SAMPLE, np.int64, PADDING_ROW, doc="next-token table row each sample goes to"),
    StepField("gen_index", Per.SAMPLE, np.int64, 0, doc="output index of the sampled token (seeds its noise)"),
    StepField("draft_token", Per.SAMPLE, np.int64, -1, doc="the proposal this sampled row verifies (-1: none)"),
    StepField("seeds", Per.SAMPLE, np.int64, 0, from_request=lambda r: r.seed),
    StepField("top_k", Per.SAMPLE, np.int64, 0, from_request=lambda r: r.params.effective_top_k),
    StepField("prompt_lens", Per.SAMPLE, np.int64, 0, from_request=lambda r: r.prompt_len),
    StepField("logprobs", Per.SAMPLE, np.int64, -1, from_request=lambda r: _or(r.params.logprobs, -1),
              doc="top logprobs wanted with the sampled token's (-1: none)"),
    # the last fixed-size int: a graph-replayed step may ship a narrower table than the graph's, and
    # every field before it then sits at the graph's offsets (``GraphFields.stage``)
    StepField("block_tables", Per.TABLE, np.int64, 0, doc="KV blocks of each sequence, as wide as the widest"),
    StepField("bias_sample", Per.BIAS, np.int64, 0, doc="sampled row of each logit-bias entry"),
    StepField("bias_token", Per.BIAS, np.int64, 0),
    StepField("prompt_logprob_index", Per.PROMPT_LOGPROB, np.int64, 0, doc="flat token whose next-token logprobs"),
    StepField("prompt_logprob_target", Per.PROMPT_LOGPROB, np.int64, 0, doc="the prompt token that follows it"),
    StepField("history_row", Per.HISTORY, np.int64, 0, doc="row of a token the step does not compute (cached)"),
    StepField("history_pos", Per.HISTORY, np.int64, 0),
    StepField("history_token", Per.HISTORY, np.int64, 0),
    # structured output: the step's grammar-constrained sampled rows; their bitmask comes after
    # submission (``Worker.provide_mask``), once the host knows the tokens before them
    StepField("mask_sample", Per.MASK, np.int64, 0, doc="sampled row of each grammar-mask row, ascending"),
    StepField("temperature", Per.SAMPLE, np.float32, 0.0, from_request=lambda r: r.params.effective_temperature),
    StepField("top_p", Per.SAMPLE, np.float32, 1.0, from_request=lambda r: r.params.top_p),
    StepField("min_p", Per.SAMPLE, np.float32, 0.0, from_request=lambda r: r.params.min_p),
    StepField("presence_penalty", Per.SAMPLE, np.float32, 0.0, from_request=lambda r: r.params.presence_penalty),
    StepField("frequency_penalty", Per.SAMPLE, np.float32, 0.0, from_request=lambda r: r.params.frequency_penalty),
    StepField("repetition_penalty", Per.SAMPLE, np.float32, 1.0, from_request=lambda r: r.params.repetition_penalty),
    StepField("bias_value", Per.BIAS, np.float32, 0.0,
              doc="added to that logit (-inf bans the token); +inf: the row samples only its +inf tokens"),
)
_VARIABLE = (Per.BIAS, Per.PROMPT_LOGPROB, Per.HISTORY, Per.MASK)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


FIELDS_BY_NAME = {f.name: f for f in STEP_FIELDS}
# packing order: fixed-size ints, variable-length ints, fixed-size floats, variable-length floats
INT_FIELDS = tuple(sorted((f for f in STEP_FIELDS if f.dtype is np.int64), key=lambda f: f.per in _VARIABLE))
FLOAT_FIELDS = tuple(sorted((f for f in STEP_FIELDS if f.dtype is np.float32), key=lambda f: f.per in _VARIABLE))
REQUEST_INT_FIELDS = tuple(f for f in INT_FIELDS if f.from_request is not None)
REQUEST_FLOAT_FIELDS = tuple(f for f in FLOAT_FIELDS if f.from_request is not None)


def request_values(request: RequestLike) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A request's constant per-sample fields (ints, floats), in field order; cached per request."""
    return (tuple(int(f.from_request(request)) for f in REQUEST_INT_FIELDS),
            tuple(float(f.from_request(request)) for f in REQUEST_FLOAT_FIELDS))


@dataclass(frozen=True)
class StepShape:
    num_tokens: int
    num_seqs: int
    num_sampled: int
    max_q: int  # longest query chunk of one sequence
    max_blocks: int  # block-table width
    num_bias: int = 0  # logit-bias entries
    num_prompt_logprobs: int = 0  # prompt-logprob entries
    num_history: int = 0  # history entries
    num_masked: int = 0  # grammar-constrained sampled rows (their mask is provided after submission)
    #: sequences with ``spec_lag`` set: the device resolves their inputs first (not a shape any
    #: captured graph reads: the resolution runs before a graph's inputs are staged)
    num_lagged: int = 0
    #: a draft model's part (``DraftShape``: words after the packed fields), 0 without one. Not a
    #: graph shape either: the draft runs before a graph's inputs are staged
    draft_rows: int = 0
    draft_k: int = 0
    draft_width: int = 0
    draft_writes: int = 0
    draft_catchup_tokens: int = 0
    draft_catchup_chunks: int = 0
    draft_catchup_max_q: int = 0

    @property
    def draft(self) -> DraftShape | None:
        if not self.draft_rows:
            return None
        return DraftShape(*(getattr(self, "draft_" + f.name) for f in fields(DraftShape)))

    def size(self, per: Per) -> int:
        return {Per.TOKEN: self.num_tokens, Per.SEQ: self.num_seqs, Per.SEQ_EDGE: self.num_seqs + 1,
                Per.SAMPLE: self.num_sampled, Per.TABLE: self.num_seqs * self.max_blocks,
                Per.BIAS: self.num_bias, Per.PROMPT_LOGPROB: self.num_prompt_logprobs,
                Per.HISTORY: self.num_history, Per.MASK: self.num_masked}[per]

    @property
    def graph_key(self) -> tuple[int, int, int, int]:
        """What a captured graph's kernels read as a shape. The variable-length lists are read after
        it, eagerly; the block table is staged into the graph's own, wider one (``fits_graph``)."""
        return self.num_tokens, self.num_seqs, self.num_sampled, self.max_q

    def fits_graph(self, captured: StepShape) -> bool:
        """Whether a graph captured for ``captured`` can run this step: the same key, and a block
        table no wider (its kernels read each sequence's columns only up to its length)."""
        return self.graph_key == captured.graph_key and self.max_blocks <= captured.max_blocks

    @property
    def num_words(self) -> int:
        """Length of the packed buffer: int fields, then float fields two to a word."""
        return -(-field_offsets(self)["_end"][0] // 2)

    @property
    def is_decode(self) -> bool:
        return self.max_q == 1


@dataclass(frozen=True)
class SamplerFlags:
    """What the sampling stage must do this step (it runs after the forward, eagerly)."""

    any_random: bool  # some row samples (temperature > 0)
    need_sort: bool  # some random row uses top-k or top-p
    penalties: bool = False  # some row has presence / frequency / repetition penalties
    logprobs: int = -1  # most top logprobs a sampled row wants (-1: none wants logprobs)
    prompt_logprobs: int = -1  # most top logprobs a prompt-logprob entry wants (-1: none)
    penalty_span: int = 0  # with penalties: the longest prompt + output a penalised row has so far
    allowed_tokens: bool = False  # some bias entry is +inf: its row may sample only such tokens
    #: some sequence samples nothing (a prefill chunk): the token history records the step (the
    #: chunk may be a penalised request's; its sampled rows later count these positions)
    unsampled: bool = False
    #: some row verifies a proposal (``draft_token``): each sequence's last accepted draw goes to the
    #: next-token table, and what it rejected to the device's table the next step resolves from
    speculative: bool = False


@dataclass(frozen=True)
class Padding:
    """Pad a step to a captured graph's static shape: a decode graph pads sequences (one token and one
    sample each); a piecewise graph of a mixed step pads only its tokens.

    A decode graph's block table is ``max_blocks`` wide (``max_model_len`` over the block size: 8192
    columns for a 128K-token model), but a step ships only the columns its longest sequence uses,
    rounded up to a power of two (few distinct shapes); the device stages them into the graph's
    table. Shipping the full width cost the host a gather and a copy of sequences x max_model_len
    entries every step (16 MiB at 256 sequences of a 128K model)."""

    num_tokens: int
    num_seqs: int | None = None  # None: keep the step's sequences
    max_blocks: int | None = None  # a decode graph's block-table width: a step ships at most this many
    padding_row: int = 0  # next-token table row that padding rows sample into and nothing reads
    full_table: bool = False  # ship all ``max_blocks`` columns (the steps a graph is captured from)


@dataclass
class StepInputs:
    step_id: int
    shape: StepShape
    sampler: SamplerFlags
    data: np.ndarray  # int64 [shape.num_words]: every field packed, in STEP_FIELDS order


@dataclass
class Logprobs:
    """Log-probabilities of chosen tokens (sampled ones, or the prompt token at a position) with the
    most likely alternatives: one row per entry."""

    logprob: np.ndarray  # [N] float32, of the chosen token
    rank: np.ndarray  # [N] int64, 1 for the most likely token
    top_ids: np.ndarray  # [N, K] int64, most likely first
    top_logprobs: np.ndarray  # [N, K] float32


@dataclass
class StepOutput:
    """What the device returns for one step: one sampled token per sampled row, in schedule order,
    and the logprobs the step asked for (rows that did not ask hold values to ignore)."""

    step_id: int
    token_ids: np.ndarray  # int64 (a list works too)
    logprobs: Logprobs | None = None  # one row per sampled row
    prompt_logprobs: Logprobs | None = None  # one row per prompt-logprob entry of the step
    #: per sampled row, the proposal it verified, as the device made it (a draft model's step only)
    draft_tokens: np.ndarray | None = None


@dataclass(frozen=True)
class OutputPart:
    name: str
    rows: int
    cols: int  # 1 for a plain [rows] vector
    dtype: type


def output_layout(shape: StepShape, flags: SamplerFlags) -> tuple[list[OutputPart], list[OutputPart]]:
    """The returned fields (ints, then floats packed two to a word), as the device packs them."""
    s, p = shape.num_sampled, shape.num_prompt_logprobs
    ints, floats = [OutputPart("token_ids", s, 1, np.int64)], []
    if shape.draft_rows:  # the proposals the draft made on the device, for the host's counters
        ints.append(OutputPart("draft_token", s, 1, np.int64))
    for prefix, rows, k in (("", s, flags.logprobs), ("prompt_", p, flags.prompt_logprobs)):
        if k >= 0:
            ints += [OutputPart(prefix + "rank", rows, 1, np.int64), OutputPart(prefix + "top_ids", rows, k, np.int64)]
            floats += [OutputPart(prefix + "logprob", rows, 1, np.float32),
                       OutputPart(prefix + "top_logprobs", rows, k, np.float32)]
    return ints, floats


def output_words(shape: StepShape, flags: SamplerFlags) -> int:
    ints, floats = output_layout(shape, flags)
    return sum(x.rows * x.cols for x in ints) + -(-sum(x.rows * x.cols for x in floats) // 2)


def parse_output(buf: np.ndarray, step_id: int, shape: StepShape, flags: SamplerFlags) -> StepOutput:
    """The host's reading of the int64 buffer the device returned for one step."""
    ints, floats = output_layout(shape, flags)
    values: dict[str, np.ndarray] = {}
    offset = 0
    for part in ints:
        values[part.name] = buf[offset:offset + part.rows * part.cols].reshape(part.rows, part.cols)
        offset += part.rows * part.cols
    words = buf[offset:offset + -(-sum(x.rows * x.cols for x in floats) // 2)].view(np.float32)
    offset = 0
    for part in floats:
        values[part.name] = words[offset:offset + part.rows * part.cols].reshape(part.rows, part.cols)
        offset += part.rows * part.cols
    drafts = values["draft_token"][:, 0] if "draft_token" in values else None
    return StepOutput(step_id, values["token_ids"][:, 0], _logprobs(values, ""), _logprobs(values, "prompt_"), drafts)


def _logprobs(values: dict[str, np.ndarray], prefix: str) -> Logprobs | None:
    if prefix + "rank" not in values:
        return None
    return Logprobs(values[prefix + "logprob"][:, 0], values[prefix + "rank"][:, 0], values[prefix + "top_ids"],
                    values[prefix + "top_logprobs"])


def pack(arrays: dict[str, np.ndarray], shape: StepShape) -> np.ndarray:
    """Every field (checked against its size) into one int64 step buffer, in field order."""
    out = np.zeros(shape.num_words, np.int64)  # zeros: the alignment gaps are never read
    floats = out.view(np.float32)
    offsets = field_offsets(shape)
    for f in INT_FIELDS:
        start, size = offsets[f.name]
        out[start:start + size] = _checked(arrays[f.name], f, size)
    for f in FLOAT_FIELDS:
        start, size = offsets[f.name]
        floats[start:start + size] = _checked(arrays[f.name], f, size)
    return out


def _checked(a: Any, f: StepField, size: int) -> np.ndarray:
    a = np.asarray(a).ravel()
    if a.size != size:
        raise AssertionError(f"step field {f.name} has {a.size} values, the shape needs {size}")
    return a


@lru_cache(maxsize=1024)
def field_offsets(shape: StepShape) -> dict[str, tuple[int, int]]:
    """(start, length) of each field in the packed buffer, counted in elements of its own dtype
    (cached per shape: the steady state repeats a few shapes; treat the result as read-only).

    Each field starts on a 16-byte boundary. Triton compiles a kernel variant per alignment of its
    pointer arguments, and the kernels read these fields in place: with packed offsets a field's
    alignment flipped with the step's sizes, and a server met new variants mid-run (a 1-2 s stall
    of every request, compiling)."""
    out: dict[str, tuple[int, int]] = {}
    offset = 0
    for f in INT_FIELDS:
        offset += offset % 2  # every field starts 16-byte aligned (see the docstring)
        out[f.name] = (offset, shape.size(f.per))
        offset += shape.size(f.per)
    offset = (offset + offset % 2) * 2  # float32 elements from here on
    for f in FLOAT_FIELDS:
        offset += -offset % 4
        out[f.name] = (offset, shape.size(f.per))
        offset += shape.size(f.per)
    out["_end"] = (offset, 0)  # where the floats end, in float32 elements
    return out
