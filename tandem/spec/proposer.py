"""Proposers: each speculating sequence gets up to k proposed next tokens per step.

A proposer sees only known tokens (the host drains the device before a speculating step, see
docs/pipeline.md), and its proposals are deterministic functions of them (q is one-hot), which is
what lets verification be an exact match against the target's own draw (``verify``). An
EAGLE-style head would implement the same interface (its proposals from the target's hidden states,
which would come back with the step's output); it is not built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ProposalRequest:
    """One sequence that may speculate this step: all its tokens (prompt + output, all known), and
    how many proposals it may take (fewer near its max_tokens or the step's token budget)."""

    request_id: str
    tokens: list[int]
    max_proposals: int


class Proposer(Protocol):
    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Per request, up to its ``max_proposals`` tokens to follow its tokens (possibly none)."""
        ...

    def release(self, request_id: str) -> None:
        """The request ended (or was preempted): forget what is kept for it."""
        ...


class NgramProposer:
    """Prompt lookup: find the last n tokens earlier in the request's prompt + output (n from
    ``max_n`` down to ``min_n``, the most recent earlier occurrence) and propose what followed it
    (``ngram_lookup``)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        return [ngram_lookup(r.tokens, self.min_n, self.max_n, r.max_proposals) for r in requests]

    def release(self, request_id: str) -> None:
        pass  # nothing kept per request


def ngram_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """``k`` tokens that followed the most recent earlier occurrence of the longest suffix (``max_n``
    down to ``min_n`` tokens) of ``tokens``, continued periodically past the end; [] when no suffix
    recurs."""
    total = len(tokens)
    if k <= 0 or total < min_n + 1:
        return []
    a = np.asarray(tokens, np.int64)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # windows starting at 0..total-n-1 (the suffix itself excluded): where each equals the suffix
        windows = np.lib.stride_tricks.sliding_window_view(a[:total - 1], n)
        hits = np.flatnonzero((windows == a[total - n:]).all(axis=1))
        if hits.size:
            return _continue(tokens, int(hits[-1]) + n, k)
    return []


def _continue(tokens: list[int], start: int, k: int) -> list[int]:
    """``k`` tokens from ``start`` on; past the end, the proposal repeats itself with the period the
    match found (a loop of a few tokens proposes k tokens of the loop, not the few before the end)."""
    out = tokens[start:start + k]
    period = len(tokens) - start
    while len(out) < k:
        out.append(out[len(out) - period])
    return out
