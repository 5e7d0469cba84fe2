"""A streamed output's token ids are a view of the running request's list, not a copy per step: each
view keeps the ids it was made with as the request grows, reads and compares like a list, and
crosses a process boundary as a plain list."""
import pickle
import random

import pytest

from tandem.engine.output_processor import OutputProcessor
from tandem.engine.scheduler import StepDeltas
from tandem.outputs import TokenIds
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import ByteTokenizer


def test_each_streamed_output_keeps_its_ids_as_the_request_grows():
    rng = random.Random(7)
    ids = [rng.randrange(32, 127) for _ in range(40)]
    proc = OutputProcessor(ByteTokenizer())
    proc.add("r", None, [1, 2], SamplingParams(max_tokens=100), stream=True)
    streamed = [proc.process(StepDeltas(["r"], [t])).outputs[0].outputs[0] for t in ids]
    final = proc.process(StepDeltas(finished={"r": "length"})).outputs[0].outputs[0]
    for i, completion in enumerate(streamed):
        assert isinstance(completion.token_ids, TokenIds)
        assert completion.token_ids == ids[:i + 1] and list(completion.token_ids) == ids[:i + 1]
    assert type(final.token_ids) is list and final.token_ids == ids


def test_the_view_reads_like_the_list_prefix():
    rng = random.Random(11)
    ids = [rng.randrange(1000) for _ in range(25)]
    view = TokenIds(ids, 17)
    ids.extend(rng.randrange(1000) for _ in range(5))  # appends after the view leave it unchanged
    prefix = ids[:17]
    assert len(view) == 17 and list(view) == prefix and repr(view) == repr(prefix)
    for s in (slice(3, 9), slice(-5, None), slice(None, None, 3), slice(10, 40), slice(20, 2, -2)):
        assert view[s] == prefix[s]
    assert [view[i] for i in range(-17, 17)] == [prefix[i] for i in range(-17, 17)]
    with pytest.raises(IndexError):
        view[17]
    with pytest.raises(IndexError):
        view[-18]
    assert view == prefix and prefix == view and view != ids and view != prefix[:-1] + [-1]
    assert view == TokenIds(ids, 17) and view != TokenIds(ids, 16)
    with pytest.raises(TypeError):
        hash(view)


def test_the_view_pickles_as_a_plain_list():
    ids = [5, 9, 2, 7]
    restored = pickle.loads(pickle.dumps(TokenIds(ids, 3)))
    assert type(restored) is list and restored == [5, 9, 2]
