"""Logprobs in OpenAI's two shapes: the completions API's parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``; with ``echo`` the prompt's tokens come
first, the very first with no logprob) and the chat API's ``content`` list of token entries; and
vLLM's ``prompt_logprobs`` (per prompt token: null for the first, else token id -> logprob, rank,
decoded token). A token that cannot be sampled (banned, outside ``allowed_token_ids``) has a
logprob of -inf, which JSON cannot write: it is written as -9999.0, as vLLM does."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tandem.outputs import TokenLogprobs

TokenText = Callable[[int], str]
LOWEST_LOGPROB = -9999.0  # what -inf is written as


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOWEST_LOGPROB


def _top(entry: TokenLogprobs | None, token: int, k: int) -> list[tuple[int, float]]:
    """The k most likely alternatives (the chosen token is listed first by the engine)."""
    if entry is None:
        return []
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(t, _finite(lp.logprob)) for t, lp in ranked[:k]]


def completion_logprobs(tokens: list[int], entries: list[TokenLogprobs | None], k: int, text: TokenText,
                        start_offset: int = 0) -> dict[str, Any]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for token, entry in zip(tokens, entries):
        piece = text(token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if entry is None else _finite(entry[token].logprob))
        out["top_logprobs"].append(None if entry is None else {text(t): lp for t, lp in _top(entry, token, k)})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokens: list[int], entries: list[TokenLogprobs], k: int, text: TokenText) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    content = [{**item(token, _finite(entry[token].logprob)),
                "top_logprobs": [item(t, lp) for t, lp in _top(entry, token, k)]}
               for token, entry in zip(tokens, entries)]
    return {"content": content}


def prompt_logprobs_list(tokens: list[int], entries: list[TokenLogprobs | None], k: int,
                         text: TokenText) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's shape: each prompt token's own logprob and the ``k`` most likely alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for token, entry in zip(tokens, entries):
        if entry is None:
            out.append(None)
            continue
        chosen = [(token, entry[token])] + sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
        out.append({str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": text(t)}
                    for t, lp in chosen})
    return out
