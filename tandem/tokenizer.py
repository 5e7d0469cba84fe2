"""Tokenizers: the checkpoint's own (via transformers) or a built-in byte-level one for presets."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

BYTE_BOS, BYTE_EOS = 256, 257


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]: ...


class ByteTokenizer:
    """The random presets' tokenizer. UTF-8 bytes are ids 0..255; 256 is BOS and 257 EOS (decoded to
    nothing); each larger id decodes to a short word of its own (`` w`` and the id in base 26), so a
    random model over a large vocabulary streams text at about a real tokenizer's rate."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
        return self.encode(text)


@functools.lru_cache(maxsize=1 << 18)
def _word(token_id: int) -> str:
    letters = []
    while token_id:
        token_id, digit = divmod(token_id, 26)
        letters.append(chr(ord("a") + digit))
    return " w" + "".join(reversed(letters))


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
            raise ValueError(f"{path}: cannot load tokenizer ({exc}); pass token-id prompts or add "
                             "tokenizer files") from exc

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template; use generate() instead")
        out = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding where 4.x returned a list
        return list(out["input_ids"] if hasattr(out, "keys") else out)
