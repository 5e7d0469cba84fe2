"""What a processed step changed, as flat lists (they may cross to another process): new tokens and
their requests, finished requests, and logprob entries."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.contract.step import Logprobs


@dataclass
class LogprobEntries:
    """Logprobs of chosen tokens, flat: entry i belongs to ``request_ids[i]``; ``index[i]`` is the
    entry's place in ``StepDeltas.token_ids`` (sampled tokens) or in the prompt (prompt logprobs).
    Its alternatives are ``top_ids`` / ``top_logprobs`` [top_start[i]:top_start[i + 1]], flat lists
    of numbers: no per-entry objects for the garbage collector to track."""

    request_ids: list[str] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    top_start: list[int] = field(default_factory=lambda: [0])
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    def add(self, request_id: str, index: int, token: int, found: Logprobs, row: int, k: int) -> None:
        self.add_rows([request_id], np.array([index]), np.array([token]), found, np.array([row]), np.array([k]))

    def add_rows(self, request_ids: list[str], index: np.ndarray, tokens: np.ndarray, found: Logprobs,
                 rows: np.ndarray, ks: np.ndarray) -> None:
        """Many entries at once: entry i is ``found``'s row ``rows[i]`` with its top ``ks[i]``."""
        self.request_ids += request_ids
        self.index += index.tolist()
        self.token_ids += tokens.tolist()
        self.logprob += found.logprob[rows].tolist()
        self.rank += found.rank[rows].tolist()
        k = int(ks[0]) if ks.size else 0
        if (ks == k).all():  # the usual case: every request asks for the same number
            ids, values = found.top_ids[rows, :k], found.top_logprobs[rows, :k]
        else:
            keep = np.arange(found.top_ids.shape[1])[None, :] < ks[:, None]  # each entry's first k
            ids, values = found.top_ids[rows][keep], found.top_logprobs[rows][keep]
        self.top_ids += ids.ravel().tolist()
        self.top_logprobs += values.ravel().tolist()
        self.top_start += (self.top_start[-1] + np.cumsum(ks)).tolist()

    def top(self, i: int) -> tuple[list[int], list[float]]:
        """Entry i's alternatives (ids, logprobs), most likely first."""
        a, b = self.top_start[i], self.top_start[i + 1]
        return self.top_ids[a:b], self.top_logprobs[a:b]

    def extend(self, other: LogprobEntries, index_offset: int = 0) -> None:
        self.request_ids += other.request_ids
        self.index += [i + index_offset for i in other.index]
        self.token_ids += other.token_ids
        self.logprob += other.logprob
        self.rank += other.rank
        self.top_start += [self.top_start[-1] + s for s in other.top_start[1:]]
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass
class StepDeltas:
    """What a processed step changed, flat and compact (it may cross to another process)."""

    token_request_ids: list[str] = field(default_factory=list)  # one entry per new token, with ...
    token_ids: list[int] = field(default_factory=list)  # ... the token
    finished: dict[str, str] = field(default_factory=dict)  # request id -> finish reason
    logprobs: LogprobEntries = field(default_factory=LogprobEntries)  # of new tokens whose requests asked
    prompt_logprobs: LogprobEntries = field(default_factory=LogprobEntries)
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed (finished "error")
    #: request id -> the error's HTTP status: 400 where the request's own fields conflict, else 500
    error_status: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.token_ids or self.finished or self.prompt_logprobs)

    @classmethod
    def merge(cls, parts: list[StepDeltas]) -> StepDeltas:
        """Consecutive steps as one (a reader that fell behind processes them together)."""
        merged = cls()
        for d in parts:
            merged.logprobs.extend(d.logprobs, len(merged.token_ids))
            merged.prompt_logprobs.extend(d.prompt_logprobs)
            merged.token_request_ids += d.token_request_ids
            merged.token_ids += d.token_ids
            merged.finished.update(d.finished)
            merged.errors.update(d.errors)
            merged.error_status.update(d.error_status)
        return merged
