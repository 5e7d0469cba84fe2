"""Tokenizers: the checkpoint's own (via transformers) or a built-in byte-level one for presets."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

BYTE_BOS, BYTE_EOS = 256, 257

#: names a chat template's extra keywords may not take: transformers' own parameters of the call, and
#: the variables the template is rendered with
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a prompt (vLLM's chat request fields of the same names)."""

    add_generation_prompt: bool = True  # open the assistant's turn after the messages
    continue_final_message: bool = False  # leave the last message open: the model continues it
    chat_template: str | None = None  # a Jinja template instead of the checkpoint's
    documents: list[dict[str, str]] | None = None  # for templates that take retrieved documents
    tools: list[dict[str, Any]] | None = None  # the request's tools, in OpenAI's shape (templates render them)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # more variables for the template

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.template_kwargs))
        if reserved:
            raise ValueError(f"chat template keywords may not set {', '.join(reserved)}")


DEFAULT_CHAT = ChatOptions()


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT) -> list[int]: ...
    def render_chat(self, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT) -> str: ...


class ByteTokenizer:
    """The random presets' tokenizer. UTF-8 bytes are ids 0..255; 256 is BOS and 257 EOS (decoded to
    nothing); each larger id decodes to a short word of its own (`` w`` and the id in base 26), so a
    random model over a large vocabulary streams text at about a real tokenizer's rate."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # adds no special tokens either way

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if all(0 <= i < 256 for i in ids):
            return bytes(ids).decode("utf-8", errors="replace")
        parts, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            elif i > BYTE_EOS:
                parts += [run.decode("utf-8", errors="replace"), _word(i)]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        return self.encode(self.render_chat(messages, options))

    def render_chat(self, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT) -> str:
        """Its own fixed format (the template keywords have no template to reach)."""
        if options.chat_template is not None:
            raise ValueError("the byte tokenizer has a fixed chat format: it takes no chat_template")
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if options.tools:
            text = f"<|tools|>\n{json.dumps(options.tools, ensure_ascii=False)}\n" + text
        if options.continue_final_message:
            text = text[:-1]  # the last message stays open
        return text + ("<|assistant|>\n" if options.add_generation_prompt else "")


@functools.lru_cache(maxsize=1 << 18)
def _word(token_id: int) -> str:
    letters = []
    while token_id:
        token_id, digit = divmod(token_id, 26)
        letters.append(chr(ord("a") + digit))
    return " w" + "".join(reversed(letters))


class HFTokenizer:
    def __init__(self, path: Path, chat_template: str | None = None) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
            raise ValueError(f"{path}: cannot load tokenizer ({exc}); pass token-id prompts or add "
                             "tokenizer files") from exc
        if chat_template is not None:  # the server's --chat-template: every request's default template
            self._tok.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        return self._tok.encode(self.render_chat(messages, options), add_special_tokens=False)

    def render_chat(self, messages: list[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT) -> str:
        """The prompt text (the template writes the special tokens it wants, so encode it without more)."""
        if options.chat_template is None and not getattr(self._tok, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template; use generate() instead")
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, chat_template=options.chat_template,
            documents=options.documents, tools=options.tools, **options.template_kwargs)
