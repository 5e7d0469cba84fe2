"""The batch builder: a scheduled step -> the flat arrays of the step contract (``contract.step.STEP_FIELDS``),
packed into one int64 buffer.

Decode tokens whose value is still pending on the device are written as ``-(row + 1)``: the device
replaces them from its next-token table before the forward. A speculating sequence (``proposals``)
computes its last token and its proposals, and samples at each of them: several sampled rows for one
sequence, in order (docs/pipeline.md, "Speculative decoding").

This runs on the host every step, in the shadow of the device's previous step. A step's decode block
is laid out from the scheduler's running state (its rows' block tables and sampling constants,
written when each sequence joined) with array operations; only its chunks (prefill, few) take a
Python pass, and the per-token work is numpy's."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from tandem.contract.step import (FLOAT_FIELDS, INT_FIELDS, REQUEST_FLOAT_FIELDS, REQUEST_INT_FIELDS, Padding, Per,
                                  SamplerFlags, StepInputs, StepShape, pack)
from tandem.contract.worker import WorkerInfo
from tandem.engine.plan import DecodeBlock, ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence


def table_width(used: int, pad: Padding | None) -> int:
    """Block-table columns of a step whose widest sequence holds ``used`` blocks."""
    if pad is None or pad.max_blocks is None:
        return used
    if pad.full_table:
        return pad.max_blocks
    return min(pad.max_blocks, 1 << (max(used, 1) - 1).bit_length())


def padding_for(sched: SchedulerOutput, info: WorkerInfo) -> Padding | None:
    """The graph shape this step fits, if any."""
    if all(i.num_tokens == 1 and i.sample for i in sched.chunks):
        size = next((s for s in info.graph_batch_sizes if s >= len(sched)), None)
        return None if size is None else Padding(size, size, info.graph_max_blocks, info.padding_row)
    tokens = sched.num_tokens
    bucket = next((t for t in info.graph_token_buckets if t >= tokens), None)
    return None if bucket is None else Padding(bucket)


def _ragged_rows(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged rows of these lengths laid end to end: each element's row and column."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, cols


@dataclass
class _Part:
    """One part of a step's sequences (its decode block, or its chunks) as arrays."""

    input_ids: np.ndarray  # per token
    starts: np.ndarray  # per sequence
    counts: np.ndarray
    rows: np.ndarray
    sample: np.ndarray  # bool, per sequence
    num_samples: np.ndarray  # per sequence: sampled rows (the last this many of its tokens)
    table: np.ndarray  # [sequences, widest block list]
    gen_index: np.ndarray  # per sampled row, as the rest
    request_ints: np.ndarray
    request_floats: np.ndarray
    biased: list[tuple[int, Sequence, int]]  # (index among the part's sampled rows, sequence, gen_index)
    lagged: np.ndarray  # per sequence, 1: its previous step, still unprocessed, speculated (``spec_lag``)
    draft: np.ndarray  # per sampled row: the proposal it verifies (-1: none)


def _decode_part(d: DecodeBlock, pad: Padding | None) -> _Part:
    """Everything from the running state's rows, no per-sequence Python. A decode-only step padded to
    a graph's batch takes its padding rows from the state's padding row, in the same gathers."""
    st, n = d.state, len(d)
    extra = pad.num_seqs - n if pad and pad.num_seqs else 0
    g, rows, starts, gen_index, pending = d.rows, d.rows, d.starts, d.gen_index, d.pending
    lagged = np.zeros(n, np.int64) if d.lagged is None else d.lagged.astype(np.int64)
    if extra > 0:  # g: where the state keeps each row's data; rows: the device rows they sample into
        g = np.concatenate([g, np.full(extra, st.padding_row)])
        rows = np.concatenate([rows, np.full(extra, pad.padding_row)])
        starts, gen_index, pending, lagged = (np.concatenate([a, np.zeros(extra, np.int64)])
                                              for a in (starts, gen_index, pending, lagged))
    width = table_width(int(st.num_blocks[g].max()), pad)
    biased = [(j, d.seqs[j], int(d.gen_index[j])) for j in np.flatnonzero(st.special[d.rows]).tolist()
              if d.seqs[j].has_bias]
    ones = np.ones(len(g), np.int64)
    return _Part(np.where(pending > 0, -(rows + 1), st.last_token[g]), starts, ones, rows,
                 np.ones(len(g), bool), ones, st.block_table[g, :width], gen_index, st.request_ints[g],
                 st.request_floats[g], biased, lagged, np.full(len(g), -1, np.int64))


def _chunk_part(items: list[ScheduledSeq]) -> _Part:
    n = len(items)
    counts = np.fromiter((it.num_tokens for it in items), np.int64, n)
    blocks = [it.seq.block_ids for it in items]
    n_blocks = np.fromiter(map(len, blocks), np.int64, n)
    table = np.zeros((n, int(n_blocks.max())), np.int64)
    table[_ragged_rows(n_blocks)] = np.fromiter(chain.from_iterable(blocks), np.int64, int(n_blocks.sum()))
    sampled = [it for it in items if it.sample]
    k_int, k_float = len(REQUEST_INT_FIELDS), len(REQUEST_FLOAT_FIELDS)
    per_seq = np.fromiter((it.num_samples for it in items), np.int64, n)
    per_sampled = per_seq[per_seq > 0]
    # a speculating sequence's rows sample output indices gen_index, gen_index + 1, ...
    sample_of, offset = _ragged_rows(per_sampled)
    gen_index = np.fromiter((it.gen_index for it in sampled), np.int64, len(sampled))[sample_of] + offset
    first_row = np.cumsum(per_sampled) - per_sampled
    return _Part(np.fromiter(chain.from_iterable(_chunk_ids(it) for it in items), np.int64, int(counts.sum())),
                 np.fromiter((it.start for it in items), np.int64, n), counts,
                 np.fromiter((it.seq.row for it in items), np.int64, n),
                 np.fromiter((it.sample for it in items), bool, n), per_seq, table, gen_index,
                 np.array([it.seq.step_values[0] for it in sampled], np.int64).reshape(-1, k_int)[sample_of],
                 np.array([it.seq.step_values[1] for it in sampled], np.float64).reshape(-1, k_float)[sample_of],
                 [(int(first_row[j]) + i, it.seq, it.gen_index + i) for j, it in enumerate(sampled)
                  if it.seq.has_bias for i in range(it.num_samples)],
                 np.fromiter((it.lagged for it in items), np.int64, n), _drafts(sampled, len(sample_of)))


def _drafts(sampled: list[ScheduledSeq], num_samples: int) -> np.ndarray:
    """Each sampled row's proposal to verify: a speculating sequence's rows verify its proposals in
    order, and its last row (the bonus draw) none."""
    if not any(it.proposals for it in sampled):
        return np.full(num_samples, -1, np.int64)
    return np.fromiter(chain.from_iterable((it.proposals or []) + [-1] for it in sampled), np.int64, num_samples)


def _padding_part(num: int, row: int) -> _Part:
    """Rows that pad a decode step to a captured graph's batch: one token at position 0 of reserved
    block 0, sampled into a row nothing reads, with every sampling field at its neutral value."""
    zeros = np.zeros(num, np.int64)
    ints = np.array([[f.pad for f in REQUEST_INT_FIELDS]] * num, np.int64).reshape(num, len(REQUEST_INT_FIELDS))
    floats = np.array([[f.pad for f in REQUEST_FLOAT_FIELDS]] * num, np.float64).reshape(num, len(REQUEST_FLOAT_FIELDS))
    ones = np.ones(num, np.int64)
    return _Part(zeros, zeros, ones, np.full(num, row), np.ones(num, bool), ones,
                 np.zeros((num, 1), np.int64), zeros, ints, floats, [], zeros, np.full(num, -1, np.int64))


def _chunk_ids(item: ScheduledSeq) -> list[int]:
    seq = item.seq
    if item.proposals:  # its last token (known, or pending on the device), then them
        return (seq.known_tokens(item.start, item.start + 1) or [-(seq.row + 1)]) + list(item.proposals)
    ids = seq.known_tokens(item.start, item.start + item.num_tokens)
    if len(ids) < item.num_tokens:  # the last position's token is still pending on the device
        ids = ids + [-(seq.row + 1)]
    return ids


def _join(parts: list[_Part], name: str) -> np.ndarray:
    return parts[0].__dict__[name] if len(parts) == 1 else np.concatenate([p.__dict__[name] for p in parts])


def _block_tables(parts: list[_Part], pad: Padding | None) -> np.ndarray:
    """One row per sequence (padding rows included), as wide as the widest (see ``table_width``)."""
    width = table_width(max(p.table.shape[1] for p in parts), pad)
    if len(parts) == 1 and parts[0].table.shape[1] == width:
        return parts[0].table
    table = np.zeros((sum(len(p.starts) for p in parts), width), np.int64)
    first = 0
    for p in parts:
        table[first:first + len(p.starts), :p.table.shape[1]] = p.table
        first += len(p.starts)
    return table


def build_step(sched: SchedulerOutput, block_size: int, pad: Padding | None = None,
               mask_sample: np.ndarray | None = None) -> StepInputs:
    """``mask_sample``: the step's grammar-constrained sampled rows (``engine.structured``), if any."""
    decode_only = sched.decode is not None and not sched.chunks
    parts = ([_decode_part(sched.decode, pad if decode_only else None)] if sched.decode is not None else []) + \
            ([_chunk_part(sched.chunks)] if sched.chunks else [])
    num_rows = sum(len(p.starts) for p in parts)
    if pad and pad.num_seqs and pad.num_seqs > num_rows:  # last: the offsets of the real rows stay
        parts.append(_padding_part(pad.num_seqs - num_rows, pad.padding_row))
    counts, starts, rows, sample, num_samples = (_join(parts, name) for name in
                                                 ("counts", "starts", "rows", "sample", "num_samples"))
    n = len(starts)
    block_tables = _block_tables(parts, pad)
    max_q = int(counts.max())
    if max_q == 1:
        token_seq, positions = np.arange(n), starts
    else:
        token_seq, token_row = _ragged_rows(counts)
        positions = starts[token_seq] + token_row
    query_start = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=query_start[1:])
    f: dict[str, np.ndarray] = {
        "input_ids": _join(parts, "input_ids"), "positions": positions,
        "slot_mapping": block_tables[token_seq, positions // block_size] * block_size + positions % block_size,
        "query_start": query_start, "seq_lens": starts + counts, "seq_rows": rows,
        **_sampled_rows(query_start, rows, sample, num_samples),
        "gen_index": _join(parts, "gen_index"), "spec_lag": _join(parts, "lagged"),
        "draft_token": _join(parts, "draft"),
    }
    _add_request_fields(f, _join(parts, "request_ints"), _join(parts, "request_floats"))
    _add_bias_entries(f, parts)
    first_chunk = len(sched.decode) if sched.decode is not None else 0
    plp_k = _add_prompt_logprob_entries(f, sched.chunks, query_start[first_chunk:])
    _add_history_entries(f, sched.chunks)
    f["mask_sample"] = _NO_ENTRIES if mask_sample is None else mask_sample
    flags = _sampler_flags(f, plp_k, bool((num_samples == 0).any()))
    if pad and pad.num_seqs is None:
        _pad_tokens(f, pad.num_tokens)
    f["block_tables"] = block_tables
    shape = StepShape(len(f["input_ids"]), block_tables.shape[0], len(f["sample_rows"]), max_q,
                      block_tables.shape[1], len(f["bias_sample"]), len(f["prompt_logprob_index"]),
                      len(f["history_row"]), len(f["mask_sample"]), int(f["spec_lag"].sum()))
    return StepInputs(sched.step_id, shape, flags, pack(f, shape))


_NO_ENTRIES = np.zeros(0, np.int64)


def _sampled_rows(query_start: np.ndarray, rows: np.ndarray, sample: np.ndarray,
                  num_samples: np.ndarray) -> dict[str, np.ndarray]:
    """Each sampled row's flat token and next-token table row: a sequence's last token, or, for a
    speculating one, its last ``num_samples`` tokens (the row repeats: only one write survives in the
    table, and nothing reads it before the host has the step's tokens)."""
    if int(num_samples.max(initial=0)) <= 1:
        return {"logits_indices": (query_start[1:] - 1)[sample], "sample_rows": rows[sample]}
    seq_of, offset = _ragged_rows(num_samples)
    return {"logits_indices": (query_start[1:] - num_samples)[seq_of] + offset, "sample_rows": rows[seq_of]}


def _sampler_flags(f: dict[str, np.ndarray], prompt_logprobs: int, unsampled: bool) -> SamplerFlags:
    random = f["temperature"] > 0
    penalised = (f["presence_penalty"] != 0) | (f["frequency_penalty"] != 0) | (f["repetition_penalty"] != 1)
    span = int((f["prompt_lens"] + f["gen_index"])[penalised].max()) if penalised.any() else 0
    return SamplerFlags(any_random=bool(random.any()),
                        need_sort=bool((random & ((f["top_k"] > 0) | (f["top_p"] < 1.0))).any()),
                        penalties=bool(penalised.any()),
                        logprobs=int(f["logprobs"].max()) if len(f["logprobs"]) else -1,
                        prompt_logprobs=prompt_logprobs, penalty_span=span,
                        allowed_tokens=bool(len(f["bias_value"]) and np.isposinf(f["bias_value"]).any()),
                        unsampled=unsampled, speculative=bool((f["draft_token"] >= 0).any()))


def _add_bias_entries(f: dict[str, np.ndarray], parts: list[_Part]) -> None:
    """(sampled row, token, value) entries: a request's logit_bias, and -inf for the stop tokens it
    may not sample yet (``min_tokens``; the count is the optimistic one, as the step's own)."""
    rows, tokens, values = [], [], []
    offset = 0
    for part in parts:
        for j, seq, gen_index in part.biased:
            if seq.bias_ids.size:
                rows.append(np.full(seq.bias_ids.size, offset + j))
                tokens.append(seq.bias_ids), values.append(seq.bias_values)
            if gen_index < seq.params.min_tokens and seq.min_tokens_ban.size:
                ban = seq.min_tokens_ban
                rows.append(np.full(ban.size, offset + j)), tokens.append(ban), values.append(np.full(ban.size, -np.inf))
        offset += len(part.gen_index)
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
            known = it.seq.known_tokens(0, it.num_cached)
            rows.append(np.full(len(known), it.seq.row)), positions.append(np.arange(len(known)))
            tokens.append(np.asarray(known, np.int64))
    f["history_row"] = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    f["history_pos"] = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    f["history_token"] = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)


def _add_request_fields(f: dict[str, np.ndarray], ints: np.ndarray, floats: np.ndarray) -> None:
    """The per-request constants (seeds, sampling settings), one row per sampled sequence."""
    for i, field in enumerate(REQUEST_INT_FIELDS):
        f[field.name] = ints[:, i]
    for i, field in enumerate(REQUEST_FLOAT_FIELDS):
        f[field.name] = floats[:, i]


def _pad_tokens(f: dict[str, np.ndarray], num_tokens: int) -> None:
    """Append tokens that belong to no sequence (a piecewise graph's token count): the attention
    metadata does not cover them, and their K/V goes to reserved block 0."""
    for field in INT_FIELDS + FLOAT_FIELDS:
        if field.per is Per.TOKEN:
            f[field.name] = np.concatenate([f[field.name], np.full(num_tokens - len(f[field.name]), field.pad)])
