"""Streamed outputs never take text back: while a request runs, text a stop string could still
remove is held back, so every streamed text is a prefix of the next and of the final text."""
import random

from checkpoints import make_tokenizer
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.scheduler import StepDeltas
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import ByteTokenizer


def _stream(tokenizer, ids, stop, include_stop=False):
    proc = OutputProcessor(tokenizer)
    proc.add("r", None, [1], SamplingParams(stop=stop, max_tokens=100, include_stop_str_in_output=include_stop),
             stream=True)
    texts = []
    for token in ids:
        out = proc.process(StepDeltas(["r"], [token]))
        texts.append(out.outputs[0].outputs[0].text)
        if out.stopped:
            return texts
    texts.append(proc.process(StepDeltas(finished={"r": "length"})).outputs[0].outputs[0].text)
    return texts


def test_a_possible_stop_prefix_is_held_back_until_it_cannot_be_one():
    tok = ByteTokenizer()
    texts = _stream(tok, list(b"ab STX"), stop="STOP")
    assert texts == ["a", "ab", "ab ", "ab ", "ab ", "ab STX", "ab STX"]
    texts = _stream(tok, list(b"ab STOP cd"), stop="STOP")
    assert texts == ["a", "ab", "ab ", "ab ", "ab ", "ab ", "ab "]
    assert _stream(tok, list(b"ab ST"), stop="STOP")[-1] == "ab ST"  # ended by length: shown in full


def test_nothing_is_held_back_when_the_stop_string_stays_in_the_output():
    texts = _stream(ByteTokenizer(), list(b"a STOP b"), stop="STOP", include_stop=True)
    assert texts == ["a", "a ", "a S", "a ST", "a STO", "a STOP"]


def test_streamed_texts_only_grow_and_end_as_the_final_text():
    rng = random.Random(5)
    tok = make_tokenizer()
    words = ["the", "he ", "e c", " ca", "at", "a", "on the", "x"]
    for _ in range(200):
        ids = [rng.randrange(5, 448) for _ in range(rng.randint(1, 25))]
        stop = rng.sample(words, rng.randint(1, 3))
        texts = _stream(tok, ids, stop)
        for before, after in zip(texts, texts[1:]):
            assert after.startswith(before), (ids, stop, texts)
