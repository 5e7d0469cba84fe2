"""Incremental detokenization: the new text of each token, as soon as it is known.

Decoding a token alone can give the wrong text (byte-level pieces of one character, tokenizers that
add a space before a word), so each step decodes a short window of recent tokens and emits what the
window adds beyond its prefix. Text that ends in an incomplete character (U+FFFD while its bytes
are still arriving) is held back, but only that character: everything before it is emitted at once,
so a stop string is found on the very token that completes it. ``flush`` emits what is held back
when the request ends, so the final text equals decoding all the tokens at once."""
from __future__ import annotations

from tandem.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window decoded each step is ids[prefix_offset:]
        self.read_offset = 0  # ids[prefix_offset:read_offset] is text already emitted in full
        self.extra = 0  # characters emitted beyond that prefix's text while the window was held open

    def add(self, token_ids: list[int]) -> str:
        start = len(self.ids)
        self.ids.extend(token_ids)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        pending = full.endswith(_REPLACEMENT)
        stable = full.rstrip(_REPLACEMENT) if pending else full
        new = stable[len(prefix) + self.extra:]
        if not pending and len(full) > len(prefix):
            self.prefix_offset, self.read_offset, self.extra = self.read_offset, len(self.ids), 0
        elif full == prefix and self.extra == 0 and start == self.read_offset:
            # tokens that add no text (skipped special tokens): forget them, or the window decoded
            # each step would grow with every one of them
            del self.ids[start:]
        else:
            self.extra += len(new)
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end included)."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        self.prefix_offset = self.read_offset = len(self.ids)
        new, self.extra = full[len(prefix) + self.extra:], 0
        return new

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], self.skip) if end > start else ""
