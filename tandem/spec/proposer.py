"""Proposers: each speculating sequence gets up to k proposed next tokens per step.

A proposer's proposals are deterministic functions of the tokens before them (q is one-hot), which
is what lets verification be an exact match against the target's own draw (``verify``). Both
proposers the engine builds are asked while the previous step is still in flight (``overlaps``). N-gram lookup
sees only known tokens: it continues them further, and the host takes its proposals after a guess
of that step's outcome read off the same continuation (``engine.speculation``); a wrong guess costs
acceptance, never tokens (docs/pipeline.md). A draft model proposes ``on_device``, inside the step
that verifies its proposals, from the real tokens including those of the step in flight (the host
plans with placeholders: ``worker.draft_plan``). A proposer that does not overlap would have the
host process every step in flight first. An
EAGLE-style head would implement the same interface (its proposals from the target's hidden states,
which would come back with the step's output); it is not built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ProposalRequest:
    """One sequence that may speculate this step: its known tokens (prompt + output), and how many
    tokens to propose after them (fewer near its max_tokens or the step's token budget; more with a
    step in flight, whose guessed tokens come first)."""

    request_id: str
    tokens: list[int]
    max_proposals: int
    in_flight: int = 0  # its tokens the step in flight computes (pending on the device), all accepted


class Proposer(Protocol):
    overlaps: bool  # asked while the previous step runs (the host guesses its outcome); else after a drain
    #: its proposals are made on the device by the step that verifies them (a draft model): on the
    #: host they are placeholders, ``plan`` adds what the device needs to the step, and ``processed``
    #: gives the host the real ones before the step's tokens are taken in
    on_device: bool

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Per request, up to its ``max_proposals`` tokens to follow its tokens (possibly none)."""
        ...

    def release(self, request_id: str) -> None:
        """The request ended (or was preempted): forget what is kept for it."""
        ...


class NgramProposer:
    """Prompt lookup: find the last n tokens earlier in the request's prompt + output (n from
    ``max_n`` down to ``min_n``, the most recent earlier occurrence) and propose what followed it
    (``ngram_lookup``). Each request's tokens are kept as an array that grows with its output (a
    long prompt is converted once, not every step)."""

    overlaps = True  # cheap enough to continue the known tokens past the step in flight
    on_device = False

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._tokens: dict[str, np.ndarray] = {}  # by request: a buffer, tokens up to _lengths
        self._lengths: dict[str, int] = {}

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        return [ngram_lookup(self._array(r), self.min_n, self.max_n, r.max_proposals) for r in requests]

    def release(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)
        self._lengths.pop(request_id, None)

    def _array(self, r: ProposalRequest) -> np.ndarray:
        buf, n = self._tokens.get(r.request_id), self._lengths.get(r.request_id, 0)
        total = len(r.tokens)
        if buf is None or total < n:
            buf, n = np.zeros(max(64, 2 * total), np.int64), 0
        elif total > buf.size:
            buf = np.concatenate([buf[:n], np.zeros(total + buf.size - n, np.int64)])
        buf[n:total] = r.tokens[n:]
        self._tokens[r.request_id], self._lengths[r.request_id] = buf, total
        return buf[:total]


def ngram_lookup(tokens: list[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """``k`` tokens that followed the most recent earlier occurrence of the longest suffix (``max_n``
    down to ``min_n`` tokens) of ``tokens``, continued periodically past the end; [] when no suffix
    recurs. O(len) for the scan for the last token, then O(its earlier occurrences x max_n)."""
    a = np.asarray(tokens, np.int64)
    total = a.size
    if k <= 0 or total < min_n + 1:
        return []
    # ends[i]: where an earlier occurrence of the suffix would end; matched[i]: its length so far
    ends = np.flatnonzero(a[:total - 1] == a[total - 1])
    matched = np.ones(ends.size, np.int64)
    for m in range(1, min(max_n, total - 1)):
        go_on = (matched == m) & (ends >= m)
        go_on[go_on] = a[ends[go_on] - m] == a[total - 1 - m]
        matched[go_on] += 1
    best = matched.max(initial=0)
    if best < min_n:
        return []
    end = int(ends[np.flatnonzero(matched == best)[-1]])
    return _continue(a, end + 1, k)


def _continue(tokens: np.ndarray, start: int, k: int) -> list[int]:
    """``k`` tokens from ``start`` on; past the end, the proposal repeats itself with the period the
    match found (a loop of a few tokens proposes k tokens of the loop, not the few before the end)."""
    out = tokens[start:start + k].tolist()
    period = tokens.size - start
    while len(out) < k:
        out.append(out[len(out) - period])
    return out
