"""Incremental detokenization: final text equals decoding all tokens at once, and stop strings are
found on the token that completes them, also when that token ends in an incomplete character."""
import random

import pytest

from checkpoints import make_tokenizer
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.scheduler import StepDeltas
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import ByteTokenizer


class PieceTokenizer:
    """Each id is a fixed byte string; decoding joins them and replaces invalid UTF-8."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


ZHONG_AND_LEAD = "中".encode() + b"\xe6"  # a whole character, then the first byte of 文 (E6 96 87)
PIECES = [ZHONG_AND_LEAD, b"\x96\x87", b"a", b" b", b"\xe4", b"\xb8\xad", b""]


def _detok_all(tokenizer, ids):
    d = IncrementalDetokenizer(tokenizer, True)
    return "".join(d.add([t]) for t in ids) + d.flush()


def test_held_back_text_is_flushed_at_the_end():
    tok = PieceTokenizer(PIECES)
    d = IncrementalDetokenizer(tok, True)
    assert d.add([0]) == "中"  # emitted at once: only the incomplete character is held back
    assert d.flush() == "\ufffd"  # the request ended: what was held back comes out
    assert _detok_all(tok, [0]) == tok.decode([0])
    assert _detok_all(tok, [0, 1, 2]) == "中文a"


@pytest.mark.parametrize("tokenizer", ["bytes", "pieces", "bpe"])
def test_incremental_text_equals_decoding_everything(tokenizer):
    rng = random.Random(3)
    tok = {"bytes": ByteTokenizer(), "pieces": PieceTokenizer(PIECES), "bpe": make_tokenizer()}[tokenizer]
    vocab = {"bytes": 600, "pieces": len(PIECES), "bpe": 448}[tokenizer]  # bytes: BOS/EOS and words too
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        assert _detok_all(tok, ids) == tok.decode(ids, skip_special_tokens=True), ids


def test_tokens_without_text_do_not_grow_the_window():
    """Skipped special tokens add no text: they are forgotten, so each step decodes a short window
    (a stream of them would otherwise cost a decode of everything so far per token)."""
    tok = PieceTokenizer(PIECES)
    d = IncrementalDetokenizer(tok, True)
    texts = [d.add([2])] + [d.add([6]) for _ in range(500)] + [d.add([3]), d.add([4]), d.add([5])]
    assert len(d.ids) < 10
    assert "".join(texts) + d.flush() == tok.decode([2] + [6] * 500 + [3, 4, 5]) == "a b中"


def test_byte_tokenizer_gives_words_above_the_byte_range():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 257]) == "hi"  # BOS and EOS decode to nothing
    words = [tok.decode([i]) for i in range(258, 2000)]
    assert all(w.startswith(" w") and w[2:].isalpha() for w in words) and len(set(words)) == len(words)
    assert tok.decode([104, 300, 105]) == "h" + tok.decode([300]) + "i"


def _run(tokenizer, ids, stop):
    proc = OutputProcessor(tokenizer)
    proc.add("r", None, [1], SamplingParams(stop=stop, max_tokens=50), stream=False)
    for i, token in enumerate(ids):
        step = proc.process(StepDeltas(["r"], [token]))
        if step.stopped:
            return i, step.outputs[0].outputs[0]
    return None, proc.process(StepDeltas(finished={"r": "length"})).outputs[0].outputs[0]


def test_stop_string_found_on_the_token_that_completes_it():
    at, out = _run(PieceTokenizer(PIECES), [2, 0, 1, 2, 2], stop="中")
    assert at == 1 and out.finish_reason == "stop" and out.text == "a" and out.token_ids == [2, 0]


def test_stop_string_split_over_bytes_and_a_flush_that_completes_one():
    at, out = _run(PieceTokenizer(PIECES), [2, 4, 5, 3], stop="a中")
    assert at == 2 and out.text == ""
    # the stop string is only complete once the request ends and the tail is flushed
    at, out = _run(PieceTokenizer(PIECES), [2, 0], stop="中\ufffd")
    assert at is None and out.finish_reason == "stop" and out.text == "a"
