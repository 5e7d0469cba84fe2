"""The server's tokenizer calls, made so that a worker thread running them leaves the event loop free.

The Hugging Face ``tokenizers`` backend releases the GIL in its batch calls, not in its one-text
``encode``; transformers' wrappers call the batch one, then build Python lists of the ids, type ids
and attention mask while holding the GIL (measured on a 4 MB text, 2.5M tokens: ``encode`` held it
for 7.9 s, transformers' ``encode`` for up to 0.8 s at a time, ``encode_batch_fast`` plus ``.ids``
for under 0.1 s). So a text is encoded here with the backend's batch call on one text: the call
transformers makes itself, minus the conversions, whenever the backend is in the state transformers
would put it in (no truncation or padding, special tokens split as configured); otherwise through
transformers. The ids are the same either way (tested).

The backend is only read here, never reconfigured, so worker threads and the event loop (which
detokenizes outputs) can use it at once. ``HFTokenizer`` wraps the transformers tokenizer as
``_tok``: reached here, in one place, rather than widening the engine's ``Tokenizer`` protocol."""
from __future__ import annotations

from typing import Any

from tandem.tokenizer import DEFAULT_CHAT, ChatOptions, Tokenizer


def hf_of(tokenizer: Tokenizer | None) -> Any | None:
    """The transformers tokenizer inside ``tokenizer`` (None for the presets' byte tokenizer)."""
    return getattr(tokenizer, "_tok", None)


def _backend(hf: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` that transformers would call as it stands, or None."""
    backend = getattr(hf, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None  # transformers turns these off (reconfiguring the backend) before each call
    if backend.encode_special_tokens != bool(getattr(hf, "split_special_tokens", False)):
        return None
    return backend


def encode_text(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text)`` (with ``add_special_tokens=True``), releasing the GIL while it runs."""
    hf = hf_of(tokenizer)
    if hf is None:
        return tokenizer.encode(text)  # the byte tokenizer adds no special tokens
    backend = _backend(hf)
    if backend is None:
        return list(hf.encode(text, add_special_tokens=add_special_tokens))
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no character offsets
    return encode([text], add_special_tokens=add_special_tokens)[0].ids


def chat_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT,
             add_special_tokens: bool = False) -> list[int]:
    """``tokenizer.apply_chat_template(messages, options)``."""
    return chat_prompt(tokenizer, messages, options, add_special_tokens)[1]


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT,
                add_special_tokens: bool = False) -> tuple[str, list[int]]:
    """The prompt text and ids of a conversation: the template rendered (Python, which yields the
    GIL), then its text encoded as transformers does (no special tokens added unless asked: the
    template writes them)."""
    text = tokenizer.render_chat(messages, options)
    return text, encode_text(tokenizer, text, add_special_tokens=add_special_tokens)
