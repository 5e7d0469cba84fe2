"""The model's vocabulary as xgrammar sees it (``xgrammar.TokenizerInfo``): every token id's bytes,
which ids are special (never allowed by a grammar) and which end the output (the model's EOS ids,
which a grammar allows only where it may end)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tandem.model.sources import is_preset
from tandem.tokenizer import BYTE_BOS, BYTE_EOS, ByteTokenizer

if TYPE_CHECKING:
    import xgrammar


def tokenizer_info(model: str, vocab_size: int, eos_token_ids: Iterable[int]) -> xgrammar.TokenizerInfo:
    """For a checkpoint folder (its Hugging Face tokenizer) or a random preset (the byte tokenizer).
    Sized to the model's vocabulary (its logits): ids past the tokenizer's are never allowed."""
    import xgrammar as xgr

    stops = sorted(eos_token_ids) or None  # None: xgrammar finds them in the vocabulary
    if is_preset(model):
        return xgr.TokenizerInfo(byte_vocab(vocab_size), xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=stops)
    from transformers import AutoTokenizer

    return xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model), vocab_size=vocab_size,
                                              stop_token_ids=stops)


def byte_vocab(vocab_size: int) -> list[bytes]:
    """The byte tokenizer's tokens: ids 0-255 are those bytes, BOS and EOS are special (empty: xgrammar
    never matches them as text), each larger id is the word it decodes to."""
    tokenizer = ByteTokenizer()
    vocab = [bytes([i]) for i in range(min(vocab_size, 256))]
    for i in range(256, vocab_size):
        vocab.append(b"" if i in (BYTE_BOS, BYTE_EOS) else tokenizer.decode([i]).encode())
    return vocab
