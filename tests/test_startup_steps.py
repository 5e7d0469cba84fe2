"""The synthetic steps the engine builds for a worker's start-up (``engine.startup_steps``): the memory
plan's worst cases are as large as the scheduler's, the capture steps have a graph's shape, and every
rank of a tensor-parallel group, handed the builder by pickle, builds the very same steps."""
import pickle

import numpy as np
import pytest

from tandem.contract.step import FIELDS_BY_NAME, Padding, StepInputs, field_offsets
from tandem.engine.startup_steps import WORST_SAMPLING, StartupStepBuilder
from tandem.worker.memory import blocks_used


def _field(step: StepInputs, name: str) -> np.ndarray:
    start, size = field_offsets(step.shape)[name]
    words = step.data if FIELDS_BY_NAME[name].dtype is np.int64 else step.data.view(np.float32)
    return words[start:start + size]


@pytest.mark.parametrize("tokens, seqs, max_len, block_size", [(1000, 7, 4096, 16), (100, 300, 64, 4),
                                                                (50, 4, 10, 4)])
def test_the_worst_eager_step_spreads_the_most_tokens_over_the_most_sequences(tokens, seqs, max_len, block_size):
    step = StartupStepBuilder().worst_eager(tokens, seqs, max_len, block_size, vocab_size=448)
    n_seqs = min(seqs, tokens)
    lens = np.diff(_field(step, "query_start"))
    assert step.shape.num_seqs == step.shape.num_sampled == n_seqs
    assert step.shape.num_tokens == lens.sum() == min(tokens, n_seqs * max_len)
    assert lens.max() - lens.min() <= 1 and lens.max() <= max_len  # as even as it gets, each within max_len
    assert (_field(step, "positions") < max_len).all() and (_field(step, "input_ids") < 448).all()
    # every sampled row asks the most of the sampler
    assert step.sampler.need_sort and step.sampler.penalties and step.sampler.logprobs == WORST_SAMPLING.logprobs
    assert (_field(step, "top_p") == np.float32(WORST_SAMPLING.top_p)).all()
    # each sequence its own blocks, from block 1 (0 is reserved), just enough of them
    slots = _field(step, "slot_mapping")
    assert len(set(slots.tolist())) == len(slots) and slots.min() >= block_size
    assert blocks_used(step) == 1 + sum(-(-int(n) // block_size) for n in lens)


def test_a_capture_step_has_the_graph_shape_and_its_whole_table():
    builder = StartupStepBuilder()
    pad = Padding(8, 8, 40, padding_row=17)
    step = builder.graph_decode(pad, 16)
    assert (step.shape.num_tokens, step.shape.num_seqs, step.shape.num_sampled, step.shape.max_q) == (8, 8, 8, 1)
    assert step.shape.max_blocks == 40 and (_field(step, "block_tables") == 0).all()  # reserved block 0 only
    assert _field(step, "sample_rows").tolist() == [17] * 8 and not step.sampler.any_random
    worst = builder.graph_decode(pad, 16, worst_sampling=True)
    assert worst.shape == step.shape and worst.sampler.need_sort and worst.sampler.logprobs == WORST_SAMPLING.logprobs


def test_every_rank_builds_the_same_steps_from_the_pickled_builder():
    """A tensor-parallel rank 0 sends the builder with the config; the profiled steps hold collectives,
    so the other ranks must build exactly what rank 0 does."""
    here, there = StartupStepBuilder(), pickle.loads(pickle.dumps(StartupStepBuilder()))
    for build in (lambda b: [b.worst_eager(300, 5, 128, 16, 1000)], lambda b: b.warm_up(4, 1000),
                  lambda b: [b.graph_decode(Padding(4, 4, 9, 3), 4, worst_sampling=True)]):
        for a, b in zip(build(here), build(there), strict=True):
            assert a.shape == b.shape and a.sampler == b.sampler and np.array_equal(a.data, b.data)
