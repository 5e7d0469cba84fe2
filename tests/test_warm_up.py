"""The start-up kernel warm-up: its steps (built by the engine, run by the worker) reach every
attention query tile and every sampling path, and they run on a real (tiny) model."""
import pytest
import torch

from tandem.engine.startup_steps import WARM_UP_STEPS, StartupStepBuilder, warm_up_steps
from tandem.kernels.paged_varlen import _tile_rows
from tandem.model.loader import load_model
from tandem.worker.warm_up import warm_up_kernels


@pytest.mark.parametrize("group", [1, 2, 4, 5, 8, 16])
def test_the_chunk_lengths_reach_every_query_tile(group):
    tiles = {_tile_rows(max(lens), group) for lens, _ in WARM_UP_STEPS}
    possible = {_tile_rows(q, group) for q in range(2, 4097)}  # max_q 1 is a decode step: its own kernel
    assert tiles == possible


def test_the_steps_ask_for_every_sampling_path():
    steps = warm_up_steps(16, 100)
    assert [s.shape.max_q for s in steps] == [max(lens) for lens, _ in WARM_UP_STEPS]  # the tiles above
    flags = [(step.sampler, params) for step, (_, params) in zip(steps, WARM_UP_STEPS, strict=True)]
    assert any(not f.any_random for f, _ in flags) and any(f.any_random and not f.need_sort for f, _ in flags)
    assert any(f.need_sort and p.top_p == 1.0 for f, p in flags)  # top-k alone
    assert any(f.need_sort and p.top_k <= 0 for f, p in flags)  # top-p alone
    assert any(f.penalties for f, _ in flags) and any(p.min_p > 0 for _, p in flags)
    assert any(f.logprobs >= 0 for f, _ in flags) and any(f.prompt_logprobs >= 0 for f, _ in flags)


def test_the_warm_up_runs_every_step_on_a_tiny_model():
    model = load_model("random:tiny", torch.device("cpu"), torch.float32, 256)
    warm_up_kernels(model, StartupStepBuilder(), block_size=4)  # raises if a step's sampling or prompt logprobs break
