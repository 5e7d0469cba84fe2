"""Turn a scheduled step into flat host arrays, packed into one int64 buffer (the float32 sampling
fields ride along bit for bit, two to a word) so a step's inputs cross to the device in one copy.

Decode tokens whose value is still pending on the device are written as ``-(slot + 1)``: the device
replaces them from its table of last sampled tokens before the forward (see ``ModelRunner``).

This runs on the host every step, in the shadow of the device's previous step, so it does one
Python pass over the sequences and leaves the per-token work to numpy."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput

INT_FIELDS = ("input_ids", "positions", "slot_mapping", "token_batch", "token_row", "q_positions",
              "seq_lens_k", "block_tables", "logits_indices", "sample_slots", "top_k", "seeds", "gen_index")
FLOAT_FIELDS = ("temperature", "top_p", "min_p")


@dataclass
class StepShape:
    num_tokens: int
    num_seqs: int
    num_sampled: int
    max_q: int
    max_blocks: int

    @property
    def num_words(self) -> int:
        """Length of the packed buffer: the int fields, then the float fields two to a word."""
        return sum(self.int_sizes().values()) + -(-len(FLOAT_FIELDS) * self.num_sampled // 2)

    def int_sizes(self) -> dict[str, int]:
        t, b, s = self.num_tokens, self.num_seqs, self.num_sampled
        return {"input_ids": t, "positions": t, "slot_mapping": t, "token_batch": t, "token_row": t,
                "q_positions": b * self.max_q, "seq_lens_k": b, "block_tables": b * self.max_blocks,
                "logits_indices": s, "sample_slots": s, "top_k": s, "seeds": s, "gen_index": s}


@dataclass
class StepInputs:
    step_id: int
    shape: StepShape
    data: np.ndarray  # int64: INT_FIELDS in order, then FLOAT_FIELDS as float32 bits
    any_random: bool  # some row samples (temperature > 0)
    need_sort: bool  # some row uses top-k or top-p


@dataclass
class Padding:
    """Pad a decode step to a captured graph's static shape."""

    num_seqs: int
    max_blocks: int
    dummy_slot: int  # next-token table row that padding rows write to and nothing reads


# A padding row: one greedy token at position 0 writing K/V into reserved block 0, sampling into
# the dummy slot. (field, value) for the per-sequence int fields and the float fields.
_PAD_INTS = {"input_ids": 0, "positions": 0, "slot_mapping": 0, "token_row": 0, "seq_lens_k": 1, "top_k": 0,
             "seeds": 0, "gen_index": 0}
_PAD_FLOATS = {"temperature": 0.0, "top_p": 1.0, "min_p": 0.0}


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
    return -(item.seq.slot + 1) if token is None else token


def _chunk_ids(item: ScheduledSeq) -> list[int]:
    seq, start, end = item.seq, item.start, item.start + item.num_tokens
    ids = (seq.prompt_token_ids[start:end] if end <= seq.prompt_len
           else (seq.prompt_token_ids + seq.output_token_ids)[start:end])
    if len(ids) < item.num_tokens:  # the last position's token is still pending on the device
        ids = ids + [-(seq.slot + 1)]
    return ids


def build_step(sched: SchedulerOutput, block_size: int, pad: Padding | None = None) -> StepInputs:
    items = sched.items
    n = len(items)
    starts = np.fromiter((it.start for it in items), np.int64, n)
    counts = np.fromiter((it.num_tokens for it in items), np.int64, n)
    max_q = int(counts.max())
    blocks = [it.seq.block_ids for it in items]
    n_blocks = np.fromiter(map(len, blocks), np.int64, n)
    max_blocks = pad.max_blocks if pad else int(n_blocks.max())
    num_rows = pad.num_seqs if pad else n
    block_tables = np.zeros((num_rows, max_blocks), dtype=np.int64)
    block_tables[_ragged_rows(n_blocks)] = np.fromiter(chain.from_iterable(blocks), np.int64, int(n_blocks.sum()))

    token_batch, token_row = _ragged_rows(counts)
    positions = starts[token_batch] + token_row
    f = {"input_ids": _input_ids(items, max_q), "positions": positions, "token_batch": token_batch,
         "token_row": token_row, "seq_lens_k": starts + counts,
         "slot_mapping": block_tables[token_batch, positions // block_size] * block_size + positions % block_size}
    sampled = [it for it in items if it.sample]
    f["logits_indices"] = (np.cumsum(counts) - 1)[np.fromiter((it.sample for it in items), bool, n)]
    f["sample_slots"] = np.fromiter((it.seq.slot for it in sampled), np.int64, len(sampled))
    f["gen_index"] = np.fromiter((it.gen_index for it in sampled), np.int64, len(sampled))
    rows = np.array([it.seq.sampling_row for it in sampled], dtype=np.float64).reshape(-1, 4)
    f["top_k"], f["seeds"] = rows[:, 3].astype(np.int64), np.array([it.seq.seed for it in sampled], np.int64)
    floats = {"temperature": rows[:, 0], "top_p": rows[:, 1], "min_p": rows[:, 2]}
    any_random = bool((rows[:, 0] > 0).any())
    need_sort = bool(((rows[:, 0] > 0) & ((rows[:, 3] > 0) | (rows[:, 1] < 1.0))).any())
    if pad:
        _pad(f, floats, n, pad)
    q_positions = np.zeros((num_rows, max_q), dtype=np.int64)
    q_positions[f["token_batch"], f["token_row"]] = f["positions"]
    f["q_positions"], f["block_tables"] = q_positions.ravel(), block_tables.ravel()
    shape = StepShape(len(f["input_ids"]), num_rows, len(f["sample_slots"]), max_q, max_blocks)
    packed_floats = np.concatenate([floats[k] for k in FLOAT_FIELDS]).astype(np.float32)
    if packed_floats.size % 2:
        packed_floats = np.append(packed_floats, np.float32(0))
    data = np.concatenate([np.asarray(f[k], dtype=np.int64) for k in INT_FIELDS] + [packed_floats.view(np.int64)])
    return StepInputs(sched.step_id, shape, data, any_random, need_sort)


def _pad(f: dict[str, np.ndarray], floats: dict[str, np.ndarray], num_real: int, pad: Padding) -> None:
    """Append padding rows (decode steps only: one token and one sample per row)."""
    extra = pad.num_seqs - num_real
    for k, v in _PAD_INTS.items():
        f[k] = np.concatenate([f[k], np.full(extra, v, np.int64)])
    f["token_batch"] = np.concatenate([f["token_batch"], np.arange(num_real, pad.num_seqs)])
    f["logits_indices"] = np.concatenate([f["logits_indices"], np.arange(num_real, pad.num_seqs)])
    f["sample_slots"] = np.concatenate([f["sample_slots"], np.full(extra, pad.dummy_slot, np.int64)])
    for k, v in _PAD_FLOATS.items():
        floats[k] = np.concatenate([floats[k], np.full(extra, v)])
