"""The batch builder: a scheduled step -> the flat arrays of the step contract (``step.STEP_FIELDS``),
packed into one int64 buffer.

Decode tokens whose value is still pending on the device are written as ``-(row + 1)``: the device
replaces them from its next-token table before the forward.

This runs on the host every step, in the shadow of the device's previous step, so it does one
Python pass over the sequences and leaves the per-token work to numpy."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.step import (COUNT, FLOAT_FIELDS, INT_FIELDS, PADDING_ROW, REQUEST_FLOAT_FIELDS,
                                REQUEST_INT_FIELDS, Per, SamplerFlags, StepInputs, StepShape, pack)
from tandem.engine.worker_api import WorkerInfo


@dataclass(frozen=True)
class Padding:
    """Pad a step to a captured graph's static shape: a decode graph pads sequences (one token and one
    sample each) and the block-table width; a piecewise graph of a mixed step pads only its tokens."""

    num_tokens: int
    num_seqs: int | None = None  # None: keep the step's sequences
    max_blocks: int | None = None
    padding_row: int = 0  # next-token table row that padding rows sample into and nothing reads


def padding_for(sched: SchedulerOutput, info: WorkerInfo) -> Padding | None:
    """The graph shape this step fits, if any."""
    if all(i.num_tokens == 1 and i.sample for i in sched.items):
        size = next((s for s in info.graph_batch_sizes if s >= len(sched.items)), None)
        return None if size is None else Padding(size, size, info.graph_max_blocks, info.padding_row)
    tokens = sched.num_tokens
    bucket = next((t for t in info.graph_token_buckets if t >= tokens), None)
    return None if bucket is None else Padding(bucket)


def _ragged_rows(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged rows of these lengths laid end to end: each element's row and column."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, cols


def _input_ids(items: list[ScheduledSeq], max_q: int) -> np.ndarray:
    if max_q == 1:  # decode: the last token, or a placeholder while it is still on the device
        return np.fromiter((_one_input_id(it) for it in items), np.int64, len(items))
    return np.fromiter(chain.from_iterable(_chunk_ids(it) for it in items), np.int64)


def _one_input_id(item: ScheduledSeq) -> int:
    token = item.seq.token_at(item.start)
    return -(item.seq.row + 1) if token is None else token


def _chunk_ids(item: ScheduledSeq) -> list[int]:
    seq, start, end = item.seq, item.start, item.start + item.num_tokens
    ids = (seq.prompt_token_ids[start:end] if end <= seq.prompt_len
           else (seq.prompt_token_ids + seq.output_token_ids)[start:end])
    if len(ids) < item.num_tokens:  # the last position's token is still pending on the device
        ids = ids + [-(seq.row + 1)]
    return ids


def build_step(sched: SchedulerOutput, block_size: int, pad: Padding | None = None) -> StepInputs:
    items = sched.items
    n = len(items)
    starts = np.fromiter((it.start for it in items), np.int64, n)
    counts = np.fromiter((it.num_tokens for it in items), np.int64, n)
    blocks = [it.seq.block_ids for it in items]
    n_blocks = np.fromiter(map(len, blocks), np.int64, n)
    max_blocks = pad.max_blocks if pad and pad.max_blocks else int(n_blocks.max())
    block_tables = np.zeros((pad.num_seqs if pad and pad.num_seqs else n, max_blocks), dtype=np.int64)
    block_tables[_ragged_rows(n_blocks)] = np.fromiter(chain.from_iterable(blocks), np.int64, int(n_blocks.sum()))

    max_q = int(counts.max())
    token_seq, token_row = _ragged_rows(counts)
    positions = starts[token_seq] + token_row
    sample_mask = np.fromiter((it.sample for it in items), bool, n)
    sampled = [it for it in items if it.sample]
    query_start = np.concatenate([[0], np.cumsum(counts)])
    f: dict[str, np.ndarray] = {
        "input_ids": _input_ids(items, max_q), "positions": positions,
        "slot_mapping": block_tables[token_seq, positions // block_size] * block_size + positions % block_size,
        "query_start": query_start, "seq_lens": starts + counts,
        "seq_rows": np.fromiter((it.seq.row for it in items), np.int64, n),
        "logits_indices": (query_start[1:] - 1)[sample_mask],
        "sample_rows": np.fromiter((it.seq.row for it in sampled), np.int64, len(sampled)),
        "gen_index": np.fromiter((it.gen_index for it in sampled), np.int64, len(sampled)),
    }
    _add_request_fields(f, sampled)
    _add_bias_entries(f, sampled)
    plp_k = _add_prompt_logprob_entries(f, items, query_start)
    _add_history_entries(f, items)
    flags = _sampler_flags(f, plp_k)
    if pad:
        _pad(f, n, pad)
    f["block_tables"] = block_tables
    shape = StepShape(len(f["input_ids"]), block_tables.shape[0], len(f["sample_rows"]), max_q, max_blocks,
                      len(f["bias_sample"]), len(f["prompt_logprob_index"]), len(f["history_row"]))
    return StepInputs(sched.step_id, shape, flags, pack(f, shape))


def _sampler_flags(f: dict[str, np.ndarray], prompt_logprobs: int) -> SamplerFlags:
    random = f["temperature"] > 0
    penalised = (f["presence_penalty"] != 0) | (f["frequency_penalty"] != 0) | (f["repetition_penalty"] != 1)
    span = int((f["prompt_lens"] + f["gen_index"])[penalised].max()) if penalised.any() else 0
    return SamplerFlags(any_random=bool(random.any()),
                        need_sort=bool((random & ((f["top_k"] > 0) | (f["top_p"] < 1.0))).any()),
                        penalties=bool(penalised.any()),
                        logprobs=int(f["logprobs"].max()) if len(f["logprobs"]) else -1,
                        prompt_logprobs=prompt_logprobs, penalty_span=span)


def _add_bias_entries(f: dict[str, np.ndarray], sampled: list[ScheduledSeq]) -> None:
    """(sampled row, token, value) entries: a request's logit_bias, and -inf for the stop tokens it
    may not sample yet (``min_tokens``; the count is the optimistic one, as the step's own)."""
    rows, tokens, values = [], [], []
    for j, it in enumerate(sampled):
        seq = it.seq
        if not seq.has_bias:
            continue
        if seq.bias_ids.size:
            rows.append(np.full(seq.bias_ids.size, j)), tokens.append(seq.bias_ids), values.append(seq.bias_values)
        if it.gen_index < seq.params.min_tokens and seq.min_tokens_ban.size:
            ban = seq.min_tokens_ban
            rows.append(np.full(ban.size, j)), tokens.append(ban), values.append(np.full(ban.size, -np.inf))
    f["bias_sample"] = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    f["bias_token"] = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    f["bias_value"] = np.concatenate(values) if values else np.zeros(0, np.float64)


def _add_prompt_logprob_entries(f: dict[str, np.ndarray], items: list[ScheduledSeq], query_start: np.ndarray) -> int:
    """For each prompt position p a chunk owes: its flat token (whose logits predict p + 1) and the
    prompt token at p + 1. Returns the most top logprobs an entry wants (-1: no entries)."""
    index, target, k = [], [], -1
    for b, it in enumerate(items):
        if it.plp_stop > it.plp_start:
            index.append(np.arange(it.plp_start, it.plp_stop) - it.start + query_start[b])
            target.append(np.asarray(it.seq.prompt_token_ids[it.plp_start + 1:it.plp_stop + 1], np.int64))
            k = max(k, it.seq.params.prompt_logprobs)
    f["prompt_logprob_index"] = np.concatenate(index) if index else np.zeros(0, np.int64)
    f["prompt_logprob_target"] = np.concatenate(target) if target else np.zeros(0, np.int64)
    return k


def _add_history_entries(f: dict[str, np.ndarray], items: list[ScheduledSeq]) -> None:
    """(row, position, token) of each token a penalised sequence took from the prefix cache: the
    penalties count them, and the device history has them only from the step that computed them."""
    rows, positions, tokens = [], [], []
    for it in items:
        if it.num_cached and it.seq.params.has_penalties:
            known = (it.seq.prompt_token_ids + it.seq.output_token_ids)[:it.num_cached]
            rows.append(np.full(len(known), it.seq.row)), positions.append(np.arange(len(known)))
            tokens.append(np.asarray(known, np.int64))
    f["history_row"] = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    f["history_pos"] = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    f["history_token"] = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)


def _add_request_fields(f: dict[str, np.ndarray], sampled: list[ScheduledSeq]) -> None:
    """The per-request constants (seeds, sampling settings), cached on each sequence."""
    ints = np.array([it.seq.step_values[0] for it in sampled], np.int64).reshape(len(sampled), len(REQUEST_INT_FIELDS))
    floats = np.array([it.seq.step_values[1] for it in sampled], np.float64).reshape(len(sampled),
                                                                                     len(REQUEST_FLOAT_FIELDS))
    for i, field in enumerate(REQUEST_INT_FIELDS):
        f[field.name] = ints[:, i]
    for i, field in enumerate(REQUEST_FLOAT_FIELDS):
        f[field.name] = floats[:, i]


def _pad(f: dict[str, np.ndarray], num_seqs: int, pad: Padding) -> None:
    """Append padding to every field: tokens up to ``pad.num_tokens``; with ``pad.num_seqs``, also
    sequences and samples (one token, one sequence and one sample per padding row)."""
    for field in INT_FIELDS + FLOAT_FIELDS:
        if field.per is Per.TOKEN:
            extra = pad.num_tokens - len(f[field.name])
        elif field.per in (Per.TABLE, Per.BIAS, Per.PROMPT_LOGPROB, Per.HISTORY) or pad.num_seqs is None:
            continue  # the table is built at its padded size; the lists are not padded
        else:
            extra = pad.num_seqs - num_seqs
        if field.pad == COUNT:
            tail = np.arange(f[field.name][-1] + 1, f[field.name][-1] + 1 + extra)
        else:
            tail = np.full(extra, pad.padding_row if field.pad == PADDING_ROW else field.pad)
        f[field.name] = np.concatenate([f[field.name], tail])
