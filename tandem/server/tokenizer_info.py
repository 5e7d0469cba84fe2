"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info``: what clients that tokenize on the server's
side need (lm-eval's ``local-completions`` probes them, then reads ``eos_token`` and the chat
template). ``tokenize_response`` and ``detokenize_response`` do all of a request's work, the response
encoded included, so that a large one runs whole on a worker thread (``tandem.server.offload``)."""
from __future__ import annotations

import dataclasses
from typing import Any

from starlette.responses import Response

from tandem.server.errors import APIError
from tandem.server.offload import INLINE_SIZE
from tandem.server.prompts import chat_options
from tandem.server.protocol import DetokenizeRequest, TokenizeRequest
from tandem.server.responses import json_bytes
from tandem.server.tools.protocol import template_tools
from tandem.server.tokenizing import chat_ids, encode_text, hf_of
from tandem.tokenizer import Tokenizer


def tokenize(tokenizer: Tokenizer | None, body: TokenizeRequest, trusted_templates: bool = False) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        options = dataclasses.replace(chat_options(body, trusted_templates), tools=template_tools(body.tools))
        try:  # vLLM's default for a conversation: no special tokens beyond what the template writes
            return chat_ids(tokenizer, [m.as_template_input() for m in body.messages], options,
                            bool(body.add_special_tokens))
        except Exception as exc:  # noqa: BLE001 - templates raise what they like
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
    return encode_text(tokenizer, body.prompt, body.add_special_tokens is not False)


def tokenize_size(body: TokenizeRequest) -> int:
    """Characters to tokenize (the measure ``Offload.run`` takes); a request's own chat template always
    goes to a worker thread (its cost is not its length)."""
    if body.messages is not None:
        size = sum(len(m.text) for m in body.messages)
        return size if body.chat_template is None else max(size, INLINE_SIZE + 1)
    return len(body.prompt or "")


def tokenize_response(tokenizer: Tokenizer | None, body: TokenizeRequest, max_model_len: int,
                      trusted_templates: bool = False) -> Response:
    ids = tokenize(tokenizer, body, trusted_templates)
    strs = token_strs(tokenizer, ids) if body.return_token_strs else None
    return _json({"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs})


def token_strs(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token as the vocabulary writes it (``Ġthe``, ``<s>``); a byte tokenizer's, decoded alone."""
    hf = hf_of(tokenizer)
    if hf is not None:
        return [t if isinstance(t, str) else "" for t in hf.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([t], False) for t in ids]


def detokenize_response(tokenizer: Tokenizer | None, body: DetokenizeRequest, vocab_size: int) -> Response:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if any(not 0 <= t < vocab_size for t in body.tokens):
        raise APIError(400, f"tokens must be ints in [0, {vocab_size})", "tokens")
    return _json({"prompt": tokenizer.decode(body.tokens, False)})


def _json(payload: dict[str, Any]) -> Response:
    return Response(json_bytes(payload), media_type="application/json")


def tokenizer_info(tokenizer: Tokenizer | None, max_model_len: int) -> dict[str, Any]:
    hf = hf_of(tokenizer)
    info: dict[str, Any] = {"tokenizer_class": type(hf if hf is not None else tokenizer).__name__,
                            "model_max_length": max_model_len, "bos_token": None, "eos_token": None,
                            "pad_token": None, "unk_token": None, "chat_template": None}
    if hf is not None:
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(hf, name, None)
            info[name] = value if isinstance(value, str) else None
        template = getattr(hf, "chat_template", None)
        info["chat_template"] = template if isinstance(template, str) else None
    return info
