"""``/tokenize`` and ``/tokenizer_info``: what clients that tokenize on the server's side need
(lm-eval's ``local-completions`` probes both, then reads ``eos_token`` and the chat template).

``add_special_tokens=False`` and the special-token strings need the Hugging Face tokenizer itself,
which ``tandem.tokenizer.HFTokenizer`` wraps as ``_tok``: reached here, in one place, rather than
widening the engine's ``Tokenizer`` protocol for the server alone."""
from __future__ import annotations

from typing import Any

from tandem.server.errors import APIError
from tandem.server.protocol import TokenizeRequest
from tandem.tokenizer import Tokenizer


def _hf(tokenizer: Tokenizer | None) -> Any | None:
    return getattr(tokenizer, "_tok", None)


def tokenize(tokenizer: Tokenizer | None, body: TokenizeRequest) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        try:
            return tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
        except Exception as exc:  # noqa: BLE001 - templates raise what they like
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
    hf = _hf(tokenizer)
    if hf is not None:
        return list(hf.encode(body.prompt, add_special_tokens=body.add_special_tokens))
    return tokenizer.encode(body.prompt)  # the presets' byte tokenizer adds no special tokens


def tokenizer_info(tokenizer: Tokenizer | None, max_model_len: int) -> dict[str, Any]:
    hf = _hf(tokenizer)
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
