"""Logprob entries from the engine core -> the dicts callers get (vLLM's shape: token id ->
``Logprob``, the chosen token's first, then the most likely alternatives)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from tandem.engine.scheduler import LogprobEntries
from tandem.outputs import Logprob, TokenLogprobs
from tandem.tokenizer import Tokenizer


class LogprobChunk:
    """One step's logprob entries as numpy arrays, which the garbage collector never walks: what the
    ``LogprobSeries`` of that step's requests refer to."""

    def __init__(self, entries: LogprobEntries) -> None:
        self.token_ids = np.array(entries.token_ids, np.int64)
        self.logprob = np.array(entries.logprob, np.float64)
        self.rank = np.array(entries.rank, np.int64)
        self.top_start = np.array(entries.top_start, np.int64)
        self.top_ids = np.array(entries.top_ids, np.int64)
        self.top_logprobs = np.array(entries.top_logprobs, np.float64)

    def entry(self, i: int) -> tuple[int, float, int, list[int], list[float]]:
        a, b = self.top_start[i], self.top_start[i + 1]
        return (int(self.token_ids[i]), float(self.logprob[i]), int(self.rank[i]), self.top_ids[a:b].tolist(),
                self.top_logprobs[a:b].tolist())


class LogprobDecoder:
    """Turns entries into dicts, naming each token as the tokenizer decodes it alone."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._text = lru_cache(maxsize=65536)(self._decode)
        self.text = self._text  # token id -> its text alone (None without a tokenizer), cached

    def _decode(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        """The token decoded alone (its id as text when there is no tokenizer)."""
        text = self._text(token)
        return f"<{token}>" if text is None else text

    def entry(self, entries: LogprobEntries, i: int) -> TokenLogprobs:
        out: TokenLogprobs = {entries.token_ids[i]: Logprob(entries.logprob[i], entries.rank[i],
                                                            self._text(entries.token_ids[i]))}
        for rank, (token, logprob) in enumerate(zip(*entries.top(i)), start=1):
            out.setdefault(token, Logprob(logprob, rank, self._text(token)))
        return out
