"""What callers get back (vLLM's shape)."""
from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol


@dataclass
class Logprob:
    logprob: float  # natural log, float32 precision
    rank: int  # 1 for the most likely token of the vocabulary
    decoded_token: str | None = None


# one dict per token: the chosen token's Logprob and the top alternatives', by token id
TokenLogprobs = dict[int, Logprob]


class LogprobSource(Protocol):
    """Where a series finds its entries: one step's logprob entries, kept as arrays."""

    def entry(self, i: int) -> tuple[int, float, int, list[int], list[float]]:
        """Entry i: (chosen token, its logprob, its rank, top ids, top logprobs)."""


class LogprobSeries(Sequence):
    """A request's per-token logprobs, kept as references to the steps' entry arrays (shared by every
    request of a step) and turned into ``TokenLogprobs`` dicts only when read: a long generation
    would otherwise hold millions of small objects (or lists of numbers), which the garbage
    collector's full collections would have to walk, pausing the step loop; and taking in a step's
    entries costs two appends per request. Items are only appended, so a ``view`` of the first n stays valid as the series grows."""

    def __init__(self, token_text: Callable[[int], str | None]) -> None:
        self._text = token_text
        self._sources: list[LogprobSource] = []
        self._rows = array("q")
        self._len: int | None = None  # a view's length (None: the whole series)

    def add(self, source: LogprobSource, row: int) -> None:
        """The next token's entry is ``source``'s entry ``row``."""
        self._sources.append(source)
        self._rows.append(row)

    def view(self) -> LogprobSeries:
        """The first ``len(self)`` items, unchanged by later appends."""
        out = object.__new__(LogprobSeries)
        out.__dict__.update(self.__dict__)
        out._len = len(self)
        return out

    def __len__(self) -> int:
        return len(self._rows) if self._len is None else self._len

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("logprob index out of range")
        token, logprob, rank, top_ids, top_logprobs = self._sources[i].entry(self._rows[i])
        out: TokenLogprobs = {token: Logprob(logprob, rank, self._text(token))}
        for rank, (alt, value) in enumerate(zip(top_ids, top_logprobs), start=1):
            out.setdefault(alt, Logprob(value, rank, self._text(alt)))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"LogprobSeries({list(self)!r})"


class TokenIds(Sequence):
    """The first n ids of a running request's token list, which only grows by appends: a streamed
    output's ids without copying every id so far at every step (quadratic in the output's length).
    Reads like a read-only list and compares equal to one."""

    __slots__ = ("_ids", "_len")

    def __init__(self, ids: list[int], length: int) -> None:
        self._ids = ids
        self._len = length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self._ids[slice(*i.indices(self._len))]
        if not -self._len <= i < self._len:
            raise IndexError("token index out of range")
        return self._ids[i % self._len]

    def __iter__(self):
        return islice(self._ids, self._len)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == self._len and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so unhashable like one

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self):
        return list, (list(self),)  # what crosses a process boundary is a plain list


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]  # a list once finished; while streaming, a ``TokenIds`` view
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: Sequence[TokenLogprobs] | None = None  # one per token of token_ids, when asked for
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (None: EOS, length)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # per prompt token (None for the first)
