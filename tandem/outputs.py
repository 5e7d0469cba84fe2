"""What callers get back (vLLM's shape)."""
from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float  # natural log, float32 precision
    rank: int  # 1 for the most likely token of the vocabulary
    decoded_token: str | None = None


# one dict per token: the chosen token's Logprob and the top alternatives', by token id
TokenLogprobs = dict[int, Logprob]


class LogprobSeries(Sequence):
    """A request's per-token logprobs, stored as flat arrays and turned into ``TokenLogprobs`` dicts
    only when read: a long generation would otherwise hold millions of small objects, each tracked
    by the garbage collector, whose full collections would then pause the step loop. Items are only
    appended, so a view of the first n (``view``) stays valid as the series grows."""

    def __init__(self, k: int, token_text: Callable[[int], str | None]) -> None:
        self.k = k  # alternatives per token
        self._text = token_text
        self._token, self._rank, self._top_ids = array("q"), array("q"), array("q")
        self._logprob, self._top_logprobs = array("d"), array("d")
        self._len: int | None = None  # a view's length (None: the whole series)

    def append(self, token: int, logprob: float, rank: int, top_ids: list[int], top_logprobs: list[float]) -> None:
        self._token.append(token), self._logprob.append(logprob), self._rank.append(rank)
        self._top_ids.extend(top_ids), self._top_logprobs.extend(top_logprobs)

    def view(self) -> LogprobSeries:
        """The first ``len(self)`` items, unchanged by later appends."""
        out = object.__new__(LogprobSeries)
        out.__dict__.update(self.__dict__)
        out._len = len(self)
        return out

    def __len__(self) -> int:
        return len(self._token) if self._len is None else self._len

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("logprob index out of range")
        token, k = self._token[i], self.k
        out: TokenLogprobs = {token: Logprob(self._logprob[i], self._rank[i], self._text(token))}
        ids, values = self._top_ids[i * k:(i + 1) * k], self._top_logprobs[i * k:(i + 1) * k]
        for rank, (alt, value) in enumerate(zip(ids, values), start=1):
            out.setdefault(alt, Logprob(value, rank, self._text(alt)))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"LogprobSeries({list(self)!r})"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: Sequence[TokenLogprobs] | None = None  # one per token of token_ids, when asked for

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
