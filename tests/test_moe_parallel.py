"""Mixtures of experts over two ranks (gloo, the CPU): tensor parallelism (a slice of every expert on
each rank) and expert parallelism (whole experts per rank) give the tokens of one process, and the
weights each rank holds are exactly its part of the single-device ones.

Why token equality is exact enough here: as in tests/test_tensor_parallel.py, float64 runs whose sums
are only reordered (partial expert outputs summed across ranks, one all-reduce per layer) differ by
~1e-16 relative, far below these checkpoints' top-2 logit gaps; the experts' reference accumulates
their weighted sum in float32 (layers/experts.py), which still leaves the differences ~1e-7, far
below the gaps. A wrong shard, a missed or doubled contribution, or a route sent to the wrong expert
changes tokens at once."""
import dataclasses

import pytest
import torch

from tp_cases import mixed_requests

from tandem import LLM
from tandem.model.loader import CheckpointReader, random_getter
from tandem.model.models.moe_block import MIXTRAL_NAMES, QWEN_NAMES, load_weights
from tandem.model.models.mixtral import mixtral_settings
from tandem.model.models.qwen3_moe import qwen_moe_settings
from tandem.model.presets import PRESETS
from tandem.model.sources import resolve_model_config
from tandem.model.tp_layout import TPLayout

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral"]
SETTINGS = dict(device="cpu", dtype="float64", max_num_batched_tokens=16, kv_cache_tokens=96, block_size=8,
                max_model_len=96)


def _tokens(llm: LLM) -> list[list[int]]:
    prompts, params = mixed_requests()
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def expected(checkpoint_dir):
    """Each architecture's tokens in one process (sync), computed once for both parallel modes."""
    made: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in made:
            made[arch] = _tokens(LLM(str(checkpoint_dir(arch)), async_batching=False, **SETTINGS))
        return made[arch]

    return get


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_give_the_tokens_of_one(checkpoint_dir, expected, arch, expert_parallel):
    """With chunked prefill and preemption, greedy and seeded sampling; tensor parallelism sync and
    async, expert parallelism async (the engine side of both is the same: sync == async is the
    layout-independent part)."""
    llm = LLM(str(checkpoint_dir(arch)), tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              async_batching=expert_parallel, **SETTINGS)
    try:
        runs = [_tokens(llm)]
        if not expert_parallel:
            llm.engine.core.set_async(True)
            runs.append(_tokens(llm))
        assert llm.engine.core.scheduler.num_preemptions > 0
    finally:
        llm.engine.shutdown()
    assert all(tokens == expected(arch) for tokens in runs)


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_ranks_compute_only_their_own_routes(ranks):
    """Each rank keeps exactly the routes to its own experts (the others get the dropped-route id,
    the local expert count): its alignment holds those (token, slot) pairs alone, so the rows its
    grouped GEMMs compute (the padded count) are those of its own routes; the ranks' slots partition
    all T*k; and the ranks' reference outputs sum to the whole block's."""
    from tandem.kernels.moe_align import align_tokens
    from tandem.model.layers.experts import experts_reference, route
    from tandem.model.models.moe_block import _local_routes

    g = torch.Generator().manual_seed(4)
    n_exp, k, t, local = 16, 4, 37, 16 // ranks
    x, w13, w2 = torch.randn(t, 16, generator=g), 0.2 * torch.randn(n_exp, 48, 16, generator=g), \
        0.2 * torch.randn(n_exp, 16, 24, generator=g)
    w, ids = route(2 * torch.randn(t, n_exp, generator=g), k, True)
    seen, total = [], torch.zeros(t, 16)
    for r in range(ranks):
        mine, (lw, lids) = ids // local == r, _local_routes(w, ids, r * local, local)
        assert torch.equal(lids[mine], ids[mine] - r * local) and (lids[~mine] == local).all()
        counts = torch.bincount(ids[mine].long() - r * local, minlength=local)
        for block_m in (16, 64):
            a = align_tokens(lids, local, block_m)
            assert int(a.num_padded) == int(((counts + block_m - 1) // block_m * block_m).sum())
            rows = a.sorted_ids[:int(a.num_padded)].long()
            assert sorted(rows[rows < t * k].tolist()) == torch.nonzero(mine.flatten()).flatten().tolist()
        seen += rows[rows < t * k].tolist()
        total += experts_reference(x, w13[r * local:(r + 1) * local], w2[r * local:(r + 1) * local], lw, lids)
    assert sorted(seen) == list(range(t * k))
    assert torch.allclose(total, experts_reference(x, w13, w2, w, ids), rtol=1e-5, atol=1e-6)


def _load(cfg, get, tp: TPLayout):
    settings = mixtral_settings(cfg) if cfg.architecture == "MixtralForCausalLM" else qwen_moe_settings(cfg)
    names = MIXTRAL_NAMES if cfg.architecture == "MixtralForCausalLM" else QWEN_NAMES
    return load_weights(cfg, get, settings, tp, names)


def _halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[.., 2I, ..] (gate rows then up rows) -> [.., 2, I, ..], so that slices of each can be compared."""
    shape = list(t.shape)
    return t.reshape(shape[:dim] + [2, shape[dim] // 2] + shape[dim + 1:])


def _check_shards(full, ranks: list, expert_parallel: bool) -> None:
    for i, layer in enumerate(full.layers):
        parts = [r.layers[i] for r in ranks]
        if layer.experts is None:  # a dense layer: split as a dense MLP on both modes
            assert torch.equal(torch.cat([_halves(p.gate_up, 0) for p in parts], dim=1), _halves(layer.gate_up, 0))
            continue
        w, got = layer.experts, [p.experts for p in parts]
        assert all(torch.equal(g.router, w.router) for g in got)  # the router is replicated
        if expert_parallel:  # whole experts, in order
            assert [g.first_expert for g in got] == [0, w.w13.shape[0] // 2]
            assert torch.equal(torch.cat([g.w13 for g in got]), w.w13)
            assert torch.equal(torch.cat([g.w2 for g in got]), w.w2)
        else:  # every expert's gate rows and up rows split alike, w2's columns
            assert torch.equal(torch.cat([_halves(g.w13, 1) for g in got], dim=2), _halves(w.w13, 1))
            assert torch.equal(torch.cat([g.w2 for g in got], dim=2), w.w2)
        if w.shared_gate_up is not None:  # Qwen2-MoE's shared expert: a dense MLP's split in both modes
            assert torch.equal(torch.cat([_halves(g.shared_gate_up, 0) for g in got], dim=1),
                               _halves(w.shared_gate_up, 0))
            assert torch.equal(torch.cat([g.shared_down for g in got], dim=1), w.shared_down)
            assert all(torch.equal(g.shared_gate, w.shared_gate) for g in got)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_shards_are_the_single_device_weights_split(checkpoint_dir, arch, expert_parallel):
    """Per-expert tensors read as safetensors slices, without processes."""
    path = checkpoint_dir(arch)
    cfg = resolve_model_config(str(path))
    read = lambda: CheckpointReader(path, torch.device("cpu"), torch.float32).get  # noqa: E731
    full = _load(cfg, read(), TPLayout())
    _check_shards(full, [_load(cfg, read(), TPLayout(r, 2, expert_parallel)) for r in range(2)], expert_parallel)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_preset_shards_are_the_single_device_weights_split(preset, expert_parallel):
    """Presets draw transformers' fused expert tensors; each rank cuts its part of them."""
    cfg = PRESETS[preset]
    get = random_getter(torch.device("cpu"), torch.float32, seed=3)
    full = _load(cfg, get, TPLayout())
    _check_shards(full, [_load(cfg, get, TPLayout(r, 2, expert_parallel)) for r in range(2)], expert_parallel)


def test_splits_that_do_not_fit_are_refused_before_any_process_starts():
    qwen = PRESETS["qwen3-30b-a3b"]
    TPLayout(0, 8, expert_parallel=True).check(qwen)  # 128 experts, 16 a rank
    odd = dataclasses.replace(qwen, hf={**qwen.hf, "num_experts": 126})
    with pytest.raises(ValueError, match="126 experts are not a multiple of 4"):
        TPLayout(0, 4, expert_parallel=True).check(odd)
    TPLayout(0, 2).check(odd)  # tensor parallelism splits each expert's width instead
    narrow = dataclasses.replace(qwen, hf={**qwen.hf, "moe_intermediate_size": 770})
    with pytest.raises(ValueError, match="expert intermediate size 770 is not a multiple of 4"):
        TPLayout(0, 4).check(narrow)
    TPLayout(0, 4, expert_parallel=True).check(narrow)  # whole experts: their width is not split
    with pytest.raises(ValueError, match="enable_expert_parallel.*no experts"):
        TPLayout(0, 2, expert_parallel=True).check(PRESETS["tiny"])
    with pytest.raises(ValueError, match="experts are not a multiple of 3"):
        LLM("random:tiny-mixtral", device="cpu", tensor_parallel_size=3, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="no experts"):
        LLM("random:tiny", device="cpu", enable_expert_parallel=True)  # one device: refused all the same
