"""Turn a scheduled step into flat host arrays, packed into one int64 and one float32 buffer so a
step's inputs cross to the device in (at most) two bulk copies.

Decode tokens whose value is still pending on the device are written as ``-(slot + 1)``: the device
replaces them from its table of last sampled tokens before the forward (see ``ModelRunner``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.engine.scheduler import SchedulerOutput

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

    def int_sizes(self) -> dict[str, int]:
        t, b, s = self.num_tokens, self.num_seqs, self.num_sampled
        return {"input_ids": t, "positions": t, "slot_mapping": t, "token_batch": t, "token_row": t,
                "q_positions": b * self.max_q, "seq_lens_k": b, "block_tables": b * self.max_blocks,
                "logits_indices": s, "sample_slots": s, "top_k": s, "seeds": s, "gen_index": s}


@dataclass
class StepInputs:
    step_id: int
    shape: StepShape
    ints: np.ndarray  # int64, fields in INT_FIELDS order
    floats: np.ndarray  # float32, fields in FLOAT_FIELDS order
    any_random: bool  # some row samples (temperature > 0)
    need_sort: bool  # some row uses top-k or top-p


def _sampling_rows(sched: SchedulerOutput) -> tuple[dict[str, list], bool, bool]:
    rows: dict[str, list] = {k: [] for k in ("sample_slots", "top_k", "seeds", "gen_index", *FLOAT_FIELDS)}
    any_random = need_sort = False
    for item in sched.items:
        if not item.sample:
            continue
        p = item.seq.params
        rows["sample_slots"].append(item.seq.slot)
        rows["top_k"].append(p.effective_top_k)
        rows["seeds"].append(item.seq.seed)
        rows["gen_index"].append(item.gen_index)
        rows["temperature"].append(0.0 if p.greedy else p.temperature)
        rows["top_p"].append(p.top_p)
        rows["min_p"].append(p.min_p)
        any_random |= not p.greedy
        need_sort |= not p.greedy and (p.effective_top_k > 0 or p.top_p < 1.0)
    return rows, any_random, need_sort


@dataclass
class Padding:
    """Pad a decode step to a captured graph's static shape."""

    num_seqs: int
    max_blocks: int
    dummy_slot: int  # next-token table row that padding rows write to and nothing reads


def build_step(sched: SchedulerOutput, block_size: int, pad: Padding | None = None) -> StepInputs:
    items = sched.items
    max_q = max(item.num_tokens for item in items)
    max_blocks = pad.max_blocks if pad else max(len(item.seq.block_ids) for item in items)
    num_rows = pad.num_seqs if pad else len(items)
    f: dict[str, list] = {k: [] for k in INT_FIELDS}
    block_tables = np.zeros((num_rows, max_blocks), dtype=np.int64)
    q_positions = np.zeros((num_rows, max_q), dtype=np.int64)
    for b, item in enumerate(items):
        seq, start, n = item.seq, item.start, item.num_tokens
        positions = range(start, start + n)
        f["input_ids"].extend(_input_id(seq, i) for i in positions)
        f["positions"].extend(positions)
        blocks = seq.block_ids
        f["slot_mapping"].extend(blocks[i // block_size] * block_size + i % block_size for i in positions)
        f["token_batch"].extend([b] * n)
        f["token_row"].extend(range(n))
        q_positions[b, :n] = positions
        f["seq_lens_k"].append(start + n)
        block_tables[b, :len(blocks)] = blocks
        if item.sample:
            f["logits_indices"].append(len(f["input_ids"]) - 1)
    rows, any_random, need_sort = _sampling_rows(sched)
    if pad:
        _pad_rows(f, rows, len(items), pad)
    for k in ("sample_slots", "top_k", "seeds", "gen_index"):
        f[k] = rows[k]
    f["q_positions"], f["block_tables"] = q_positions.ravel(), block_tables.ravel()
    shape = StepShape(len(f["input_ids"]), num_rows, len(rows["sample_slots"]), max_q, max_blocks)
    ints = np.concatenate([np.asarray(f[k], dtype=np.int64) for k in INT_FIELDS])
    floats = np.asarray([v for k in FLOAT_FIELDS for v in rows[k]], dtype=np.float32)
    return StepInputs(sched.step_id, shape, ints, floats, any_random, need_sort)


def _pad_rows(f: dict[str, list], rows: dict[str, list], num_real: int, pad: Padding) -> None:
    """Rows of one greedy token each at position 0, writing K/V into reserved block 0."""
    for b in range(num_real, pad.num_seqs):
        for k, v in (("input_ids", 0), ("positions", 0), ("slot_mapping", 0), ("token_batch", b), ("token_row", 0),
                     ("seq_lens_k", 1), ("logits_indices", len(f["input_ids"]))):
            f[k].append(v)
        for k, v in (("sample_slots", pad.dummy_slot), ("top_k", 0), ("seeds", 0), ("gen_index", 0),
                     ("temperature", 0.0), ("top_p", 1.0), ("min_p", 0.0)):
            rows[k].append(v)


def _input_id(seq, index: int) -> int:
    token = seq.token_at(index)
    return -(seq.slot + 1) if token is None else token
