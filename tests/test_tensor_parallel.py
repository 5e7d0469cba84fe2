"""tensor_parallel_size=2 (two processes over gloo on the CPU) gives the tokens of one process.

Every architecture's tiny checkpoint, greedy and seeded sampling in one batch, sync and async, with a
16-token budget (chunked prefill) and a 96-token KV cache (preemption); random:tiny through the
randomized sync-vs-async cases (aborts, stop strings, stop ids).

Why exact token equality is a sound test: tensor parallelism changes the arithmetic only where the
row-parallel o_proj and down_proj are summed across ranks (and the vocab-parallel embedding, which
adds zeros: exact). In float64 that reorders sums at a relative 1e-16; a greedy choice flips only
where two logits tie within ~1e-13, and a seeded draw only where two noisy scores (or a top-p mass and
its threshold) do, while these checkpoints' top-2 logit gaps are rarely below 1e-3 (checkpoints.py).
Any real fault (a wrong shard, a missed reduction, ranks out of step) changes tokens at once."""
import json
import shutil

import pytest
import torch

from differential import Case, compare, make_case, run_case
from tp_cases import mixed_requests

from tandem import LLM, SamplingParams

# the tiny checkpoint of each architecture (qwen3's and gemma3's single KV head is replicated on both
# ranks; mistral gets a sliding window shorter than the prompts, the Gemmas have theirs on their
# sliding layers, and gemma2 soft-caps)
ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]
SETTINGS = dict(device="cpu", dtype="float64", max_num_batched_tokens=16, kv_cache_tokens=96, block_size=8,
                max_model_len=96)


@pytest.fixture(scope="module")
def windowed_mistral(checkpoint_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "mistral-window"
    shutil.copytree(checkpoint_dir("mistral"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _tokens(llm: LLM) -> list[list[int]]:
    prompts, params = mixed_requests()
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_gives_the_tokens_of_tp1(checkpoint_dir, windowed_mistral, arch):
    path = str(windowed_mistral if arch == "mistral" else checkpoint_dir(arch))
    expected = _tokens(LLM(path, async_batching=False, **SETTINGS))
    llm = LLM(path, tensor_parallel_size=2, async_batching=False, **SETTINGS)
    try:
        assert llm.engine.worker.info.max_model_len == 96
        sync = _tokens(llm)
        preempted = llm.engine.core.scheduler.num_preemptions
        llm.engine.core.set_async(True)
        asyn = _tokens(llm)
        assert llm.engine.core.scheduler.num_preemptions > preempted > 0
    finally:
        llm.engine.shutdown()
    assert sync == expected
    assert asyn == expected


@pytest.mark.parametrize("seed", [1000, 1003])
def test_tp2_randomized_cases_match_tp1(seed):
    """random:tiny: every rank draws only its shards of the seeded preset, equal to tp=1's weights;
    half the requests constrained (every rank samples through rank 0's grammar masks)."""
    case = make_case(seed, constrained=0.5)
    assert any(r.params.host_masked for r in case.requests)
    expected = run_case(case, async_batching=False)
    tp_case = Case(case.seed, {**case.engine, "tensor_parallel_size": 2}, case.requests)
    for async_batching in (False, True):
        problems = compare(case, expected, run_case(tp_case, async_batching=async_batching))
        assert not problems, case.describe() + "\n" + "\n".join(problems)


def test_a_rank_that_dies_is_an_error_not_a_hang():
    import os
    import signal

    llm = LLM("random:tiny", device="cpu", dtype="float32", tensor_parallel_size=2)
    follower = llm.engine.worker.followers.procs[0]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait()
    with pytest.raises(RuntimeError):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    llm.engine.shutdown()


def test_a_model_that_does_not_split_fails_before_any_process_starts():
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        LLM("random:tiny", device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="cuda:<its local rank>"):
        LLM("random:tiny", device="cuda:1", tensor_parallel_size=2)


def test_bench_runs_a_tp_group_and_records_its_size():
    from tandem.bench.api import bench

    data = bench("random:tiny", modes=["sync", "async"], num_requests=4, prompt_len=24, max_tokens=12, progress=False,
                 device="cpu", dtype="float32", tensor_parallel_size=2)
    assert data["tensor_parallel_size"] == 2 and data["outputs_identical_across_modes"]
    assert all(m["gpu_idle_fraction"] is not None for m in data["modes"].values())
    LLM("random:tiny", device="cpu", tensor_parallel_size=2).engine.shutdown()  # bench freed the group


def test_one_shot_all_reduce_is_only_taken_on_cuda_and_can_be_turned_off(monkeypatch):
    """On a CPU (gloo) every all-reduce stays NCCL/gloo's; TANDEM_TP_ALLREDUCE=nccl keeps it so on CUDA."""
    from tandem.model.symm_allreduce import make_one_shot

    assert make_one_shot(None, torch.device("cpu"), torch.float32) is None
    monkeypatch.setenv("TANDEM_TP_ALLREDUCE", "nccl")
    assert make_one_shot(None, torch.device("cuda"), torch.bfloat16) is None
