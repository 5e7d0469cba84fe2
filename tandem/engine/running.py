"""The persistent batch: the host state of every running sequence as arrays indexed by its row (the
row of the device's next-token table it holds while it runs, stable for its whole run).

A sequence's counters (tokens computed, tokens known or pending, pending ones, newest step) live here
while it runs, so a pure-decode step advances them for the whole batch at once; its block table and
its constant sampling fields are written once when it joins and then only where something changed
(a block added). What stays per-sequence Python work is what must: appending each sampled token to
its sequence's list. ``Sequence`` reads and writes its counters through here while attached, from
its own fields otherwise (waiting, preempted, finished)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from tandem.contract.step import REQUEST_FLOAT_FIELDS, REQUEST_INT_FIELDS
from tandem.sampling_params import SamplingParams


class Joining(Protocol):
    """What ``attach`` reads of a sequence that starts running (a ``Sequence``)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    prompt_len: int
    max_new_tokens: int
    block_ids: list[int]
    step_values: tuple[tuple[int, ...], tuple[float, ...]]
    has_bias: bool


class RunningState:
    """Rows ``0..num_rows-1``; one more row (``num_rows``, the worker's padding row) never holds a
    sequence: a graph-padded decode step gathers its padding rows from it (block 0, position 0,
    neutral sampling fields)."""

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        n = num_rows + 1
        self.padding_row = num_rows
        self.computed = np.zeros(n, np.int64)  # tokens whose K/V is written or being written
        self.tokens = np.zeros(n, np.int64)  # prompt + output + pending
        self.pending = np.zeros(n, np.int64)  # sampled on the device, not yet back on the host
        self.last_step = np.full(n, -1, np.int64)  # newest step that includes the row's sequence
        self.last_token = np.zeros(n, np.int64)  # the newest known token (input of a decode step)
        self.prompt_len = np.zeros(n, np.int64)
        self.max_tokens = np.zeros(n, np.int64)  # prompt + max new tokens
        self.min_tokens = np.zeros(n, np.int64)
        self.stops_on_eos = np.zeros(n, bool)  # not ignore_eos
        self.logprobs = np.full(n, -1, np.int64)  # top logprobs a sampled token brings (-1: none)
        self.special = np.zeros(n, bool)  # logit bias, min_tokens bans or stop ids: per-sequence work
        self.structured = np.zeros(n, bool)  # structured output: its sampled rows take a grammar mask
        self.tag = np.zeros(n, np.int64)  # which admission holds the row (a step's rows are checked)
        # the newest step planned for the row verified proposals and is not processed yet: the next
        # step's inputs for it are resolved on the device (``spec_lag``)
        self.spec_lag = np.zeros(n, bool)
        self.num_blocks = np.zeros(n, np.int64)
        self.block_table = np.zeros((n, max(1, max_blocks)), np.int64)
        self.request_ints = np.zeros((n, len(REQUEST_INT_FIELDS)), np.int64)
        self.request_floats = np.zeros((n, len(REQUEST_FLOAT_FIELDS)), np.float64)
        # the padding row samples with every field at its neutral value (top_p 1, no logprobs...)
        self.request_ints[num_rows] = [f.pad for f in REQUEST_INT_FIELDS]
        self.request_floats[num_rows] = [f.pad for f in REQUEST_FLOAT_FIELDS]
        self.request_ids = np.empty(n, object)
        self.append_output = np.empty(n, object)  # each row's ``output_token_ids.append``
        self._next_tag = 0

    def attach(self, seq: Joining, row: int, computed: int, tokens: int, pending: int, last_step: int) -> None:
        """``seq`` starts running in ``row``: its counters and constants move here."""
        self._next_tag += 1
        p = seq.params
        self.tag[row] = self._next_tag
        self.spec_lag[row] = False  # a joining sequence has nothing in flight (it waited for it)
        self.computed[row], self.tokens[row], self.pending[row], self.last_step[row] = \
            computed, tokens, pending, last_step
        known = seq.prompt_len + len(seq.output_token_ids)
        self.last_token[row] = seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[known - 1]
        self.prompt_len[row] = seq.prompt_len
        self.max_tokens[row] = seq.prompt_len + seq.max_new_tokens
        self.min_tokens[row] = p.min_tokens
        self.stops_on_eos[row] = not p.ignore_eos
        self.logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.special[row] = seq.has_bias or bool(p.stop_token_ids)
        self.structured[row] = p.host_masked
        self.request_ids[row] = seq.request_id
        self.append_output[row] = seq.output_token_ids.append
        self.request_ints[row], self.request_floats[row] = seq.step_values
        self.set_blocks(row, seq.block_ids)

    def set_blocks(self, row: int, block_ids: list[int]) -> None:
        n = len(block_ids)
        if n > self.block_table.shape[1]:  # only a caller without a max_model_len bound gets here
            self.block_table = np.pad(self.block_table, ((0, 0), (0, n - self.block_table.shape[1])))
        self.block_table[row, :n] = block_ids
        # clear the row's previous holder's blocks: a step gathers rows as wide as its widest one,
        # and the columns past a row's own blocks read as zeros, as in a table built one by one
        self.block_table[row, n:self.num_blocks[row]] = 0
        self.num_blocks[row] = n

    def add_blocks(self, rows: np.ndarray, blocks: np.ndarray) -> None:
        """One more block for each of ``rows`` (distinct)."""
        n = self.num_blocks[rows]
        if int(n.max()) >= self.block_table.shape[1]:
            self.block_table = np.pad(self.block_table, ((0, 0), (0, int(n.max()) + 1 - self.block_table.shape[1])))
        self.block_table[rows, n] = blocks
        self.num_blocks[rows] = n + 1

    def extend_blocks(self, row: int, blocks: list[int]) -> None:
        """``blocks`` appended to ``row``'s block table (one slice write: an admitted prompt brings many)."""
        n, end = int(self.num_blocks[row]), int(self.num_blocks[row]) + len(blocks)
        if end > self.block_table.shape[1]:
            self.block_table = np.pad(self.block_table, ((0, 0), (0, end - self.block_table.shape[1])))
        self.block_table[row, n:end] = blocks
        self.num_blocks[row] = end
