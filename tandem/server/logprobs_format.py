"""Logprobs in OpenAI's two shapes: the completions API's parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``; with ``echo`` the prompt's tokens come
first, the very first with no logprob) and the chat API's ``content`` list of token entries."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tandem.outputs import TokenLogprobs

TokenText = Callable[[int], str]


def _top(entry: TokenLogprobs | None, token: int, k: int) -> list[tuple[int, float]]:
    """The k most likely alternatives (the chosen token is listed first by the engine)."""
    if entry is None:
        return []
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(t, lp.logprob) for t, lp in ranked[:k]]


def completion_logprobs(tokens: list[int], entries: list[TokenLogprobs | None], k: int, text: TokenText,
                        start_offset: int = 0) -> dict[str, Any]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for token, entry in zip(tokens, entries):
        piece = text(token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if entry is None else entry[token].logprob)
        out["top_logprobs"].append(None if entry is None else {text(t): lp for t, lp in _top(entry, token, k)})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokens: list[int], entries: list[TokenLogprobs], k: int, text: TokenText) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    content = [{**item(token, entry[token].logprob), "top_logprobs": [item(t, lp) for t, lp in _top(entry, token, k)]}
               for token, entry in zip(tokens, entries)]
    return {"content": content}
