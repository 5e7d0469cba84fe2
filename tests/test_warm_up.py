"""The start-up kernel warm-up: its steps reach every attention query tile and every sampling path,
and they run on a real (tiny) model."""
import pytest
import torch

from tandem.engine.batch import build_step
from tandem.engine.plan import ScheduledSeq, SchedulerOutput
from tandem.kernels.paged_varlen import _tile_rows
from tandem.model.loader import load_model
from tandem.worker.memory import synthetic_sequence
from tandem.worker.warm_up import WARM_UP_STEPS, warm_up_kernels


@pytest.mark.parametrize("group", [1, 2, 4, 5, 8, 16])
def test_the_chunk_lengths_reach_every_query_tile(group):
    tiles = {_tile_rows(max(lens), group) for lens, _ in WARM_UP_STEPS}
    possible = {_tile_rows(q, group) for q in range(2, 4097)}  # max_q 1 is a decode step: its own kernel
    assert tiles == possible


def test_the_steps_ask_for_every_sampling_path():
    flags = []
    for lens, params in WARM_UP_STEPS:
        items = [ScheduledSeq(synthetic_sequence(str(i), n, 100, params, 1 + 8 * i, 16), 0, n, True, 0)
                 for i, n in enumerate(lens)]
        if params.prompt_logprobs is not None:
            items[0].plp_stop = lens[0] - 1
        flags.append((build_step(SchedulerOutput(0, items), 16).sampler, params))
    assert any(not f.any_random for f, _ in flags) and any(f.any_random and not f.need_sort for f, _ in flags)
    assert any(f.need_sort and p.top_p == 1.0 for f, p in flags)  # top-k alone
    assert any(f.need_sort and p.top_k <= 0 for f, p in flags)  # top-p alone
    assert any(f.penalties for f, _ in flags) and any(p.min_p > 0 for _, p in flags)
    assert any(f.logprobs >= 0 for f, _ in flags) and any(f.prompt_logprobs >= 0 for f, _ in flags)


def test_the_warm_up_runs_every_step_on_a_tiny_model():
    model = load_model("random:tiny", torch.device("cpu"), torch.float32, 256)
    warm_up_kernels(model, block_size=4)  # raises if a step's sampling or prompt logprobs break
