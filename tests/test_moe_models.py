"""The mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral) beyond the parity runs every
checkpoint of tests/checkpoints.py gets in tests/test_hf_parity.py (greedy == transformers' generate,
plain and with chunked prefill + preemption, prefill logits):

- transformers' fused expert layout loads into the same model as the per-expert one it saves;
- the routing settings are not vacuous (norm_topk_prob, top-k, dense layers change the logits, and
  both sides agree on each);
- async == sync and prefix caching on == off on randomized workloads (the tiny presets; Mixtral's
  sliding window, also with prefix caching, against transformers: tests/test_hf_parity.py);
- settings the families do not implement are refused at load;
- the block's own code (router, routing, expert parallelism's dropped routes, shared expert) makes no
  host read: it runs on the meta device, where any such read raises;
- expert parallelism through the fused Triton kernel (interpreted on the CPU): each rank computes
  only the routes to its own experts."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from checkpoints import edited_copy, hf_greedy, hf_prefill_logits
from differential import compare, make_case, run_case, run_case_with_stats, with_shared_prefixes
from gpu_parity import prefill_logits, relative_error
from test_triton_kernels import _run_interpreted as run_interpreted

from tandem import LLM, SamplingParams
from tandem.model.models.moe_block import load_weights

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral"]
PRESETS = ["random:tiny-qwen3-moe", "random:tiny-mixtral"]


def _fused(src: Path, dst: Path) -> Path:
    """``src`` rewritten in transformers' fused expert layout: per layer ``mlp.experts.gate_up_proj``
    [E, 2I, H] (every expert's gate rows, then its up rows), ``mlp.experts.down_proj`` [E, H, I] and
    the router ``mlp.gate.weight`` (Mixtral's ``block_sparse_moe`` becomes ``mlp``)."""
    shutil.copytree(src, dst)
    weights = safetensors.torch.load_file(dst / "model.safetensors")
    per_expert = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in weights.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if ".mlp.experts." not in name:
            out[name] = t
            continue
        layer, rest = name.split(".mlp.experts.")
        expert, proj, _ = rest.split(".")
        experts.setdefault(layer, {}).setdefault(int(expert), {})[per_expert[proj]] = t
    for layer, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w["gate"], w["up"]]) for w in ordered])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([w["down"] for w in ordered])
    (dst / "model.safetensors").unlink()
    safetensors.torch.save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_expert_layout_loads_the_same_model(checkpoint_dir, tmp_path, arch):
    """transformers reads both layouts as the same model; so does tandem (to float32 rounding: the
    same weights at other addresses may take other SIMD paths)."""
    per_expert = checkpoint_dir(arch)
    fused = _fused(per_expert, tmp_path / "fused")
    names = safetensors.torch.load_file(fused / "model.safetensors").keys()
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names) and not any(".experts.0." in n for n in names)
    ids = torch.randint(0, 448, (29,), generator=torch.Generator().manual_seed(9)).tolist()
    ours = prefill_logits(str(fused), ids, "cpu", torch.float32)
    assert relative_error(ours, prefill_logits(str(per_expert), ids, "cpu", torch.float32)) < 1e-6
    assert relative_error(ours, hf_prefill_logits(fused, ids)) < 1e-5
    out = LLM(str(fused), device="cpu", dtype="float32").generate([ids], SamplingParams(temperature=0, max_tokens=12),
                                                                  use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(fused, ids, 12) == hf_greedy(per_expert, ids, 12)


@pytest.mark.parametrize("arch, change", [
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"num_experts_per_tok": 1}),
    ("mixtral", {"num_experts_per_tok": 3}),
])
def test_routing_settings_change_the_logits_as_in_transformers(checkpoint_dir, tmp_path, arch, change):
    ids = torch.randint(0, 448, (33,), generator=torch.Generator().manual_seed(3)).tolist()
    base = prefill_logits(str(checkpoint_dir(arch)), ids, "cpu", torch.float32)
    path = edited_copy(checkpoint_dir(arch), tmp_path / "edited", **change)
    ours = prefill_logits(str(path), ids, "cpu", torch.float32)
    assert relative_error(ours, hf_prefill_logits(path, ids)) < 1e-5
    assert relative_error(ours, base) > 1e-2, change


def test_dense_layers_follow_mlp_only_layers_and_decoder_sparse_step():
    """Which layers have experts: Qwen's two settings (transformers' rule), Mixtral all."""
    from tandem.model.models.mixtral import mixtral_settings
    from tandem.model.models.qwen3_moe import qwen_moe_settings
    from tandem.model.model_config import model_config_from_dict

    base = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 6,
            "num_attention_heads": 2, "intermediate_size": 32, "moe_intermediate_size": 8, "num_experts": 4,
            "num_experts_per_tok": 2}
    cases = [({}, (True,) * 6), ({"decoder_sparse_step": 2}, (False, True) * 3),
             ({"decoder_sparse_step": 3, "mlp_only_layers": [5]}, (False, False, True, False, False, False)),
             ({"mlp_only_layers": [0, 4]}, (False, True, True, True, False, True))]
    for change, sparse in cases:
        assert qwen_moe_settings(model_config_from_dict({**base, **change})).sparse_layers == sparse
    mixtral = {**base, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "decoder_sparse_step": 2}
    assert mixtral_settings(model_config_from_dict(mixtral)).sparse_layers == (True,) * 6


@pytest.mark.parametrize("model", PRESETS)
def test_async_and_prefix_caching_change_no_output(model):
    """Randomized cases with shared prefixes: sync with prefix caching off, sync with it on, async
    with it on; each pair the same outputs (aborts aside where caching changes the schedule)."""
    hits = 0
    for seed in range(3300, 3305):
        case = with_shared_prefixes(make_case(seed, model))
        off = run_case(case, async_batching=False, prefix_caching=False)
        on, stats = run_case_with_stats(case, async_batching=False, prefix_caching=True)
        problems = compare(case, off, on, names=("off", "on"), aborts_may_differ=True)
        problems += compare(case, on, run_case(case, async_batching=True, prefix_caching=True))
        assert not problems, case.describe() + "\n" + "\n".join(problems)
        hits += stats.prefix_cache_hits
    assert hits > 0


@pytest.mark.parametrize("arch, change, named", [
    ("qwen2_moe", {"qkv_bias": False}, "qkv_bias"),
    ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("qwen3_moe", {"num_local_experts": None}, "num_experts"),
    ("qwen2_moe", {"shared_expert_intermediate_size": None}, "shared_expert_intermediate_size"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
    ("mixtral", {"num_local_experts": 6}, "missing"),  # the checkpoint holds 4 experts
])
def test_settings_the_families_do_not_implement_are_refused(checkpoint_dir, tmp_path, arch, change, named):
    path = edited_copy(checkpoint_dir(arch), tmp_path / "edited", **change)
    with pytest.raises((NotImplementedError, ValueError), match=named):
        LLM(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("shared", [False, True])
def test_the_block_makes_no_host_read(monkeypatch, shared):
    """Router, routing, expert parallelism's dropped routes and the shared expert on the meta device (no
    data: any .item(), .tolist(), nonzero or unique there raises), the experts stubbed as the fused
    kernel's launch: what a CUDA graph captures is device work only."""
    from tandem.model.models import moe_block
    from tandem.model.models.moe_block import MoESettings, MoEWeights, moe_mlp

    def launch(hidden, w13, w2, topk_weights, topk_ids, activation):
        assert topk_ids.shape == topk_weights.shape == (hidden.shape[0], 2) and w13.shape[0] == 4
        return torch.empty_like(hidden)

    monkeypatch.setattr(moe_block, "experts", launch)
    meta, h, i = torch.device("meta"), 16, 8
    w = MoEWeights(router=torch.empty(8, h, device=meta), w13=torch.empty(4, 2 * i, h, device=meta),
                   w2=torch.empty(4, h, i, device=meta), first_expert=4)  # expert parallelism: experts 4..7 here
    if shared:
        w.shared_gate_up, w.shared_down = torch.empty(2 * i, h, device=meta), torch.empty(h, i, device=meta)
        w.shared_gate = torch.empty(1, h, device=meta)
    settings = MoESettings(num_experts=8, top_k=2, renormalize=True, expert_intermediate=i, sparse_layers=(True,))
    out = moe_mlp(torch.empty(5, h, device=meta), w, settings)
    assert out.shape == (5, h) and out.device == meta


EXPERT_PARALLEL = r"""
import torch
import torch.nn.functional as F
from tandem.kernels import fused_moe
from tandem.model.layers.experts import route
from tandem.model.models.moe_block import MoESettings, MoEWeights, moe_mlp

# two ranks' halves of the experts (their routes to the other half: the dropped-route id 4) sum to
# the whole block, with the experts through the fused kernel; each rank's alignment (the rows its
# grouped GEMMs compute) holds exactly the routes to its own experts
aligned, align = [], fused_moe.align
def recording(ids, n_exp, block_m):
    aligned.append(align(ids, n_exp, block_m))
    return aligned[-1]
fused_moe.align = recording
gen = torch.Generator().manual_seed(5)
x, router = torch.randn(9, 32, generator=gen), torch.randn(8, 32, generator=gen)
w13, w2 = 0.2 * torch.randn(8, 32, 32, generator=gen), 0.2 * torch.randn(8, 32, 16, generator=gen)
s = MoESettings(num_experts=8, top_k=3, renormalize=True, expert_intermediate=16, sparse_layers=(True,))
whole = moe_mlp(x, MoEWeights(router, w13, w2, 0), s)
halves = [moe_mlp(x, MoEWeights(router, w13[r * 4:r * 4 + 4], w2[r * 4:r * 4 + 4], r * 4), s) for r in (0, 1)]
assert torch.allclose(halves[0] + halves[1], whole, rtol=1e-5, atol=1e-6)
ids = route(F.linear(x, router), 3, True)[1]
for r, a in enumerate(aligned[1:]):
    mine = (ids // 4 == r).flatten()
    rows = a.sorted_ids[:int(a.num_padded)].long()
    assert sorted(rows[rows < ids.numel()].tolist()) == torch.nonzero(mine).flatten().tolist(), r
    counts = torch.bincount(ids.flatten()[mine].long() - 4 * r, minlength=4)
    assert int(a.num_padded) == int(((counts + a.block_m - 1) // a.block_m * a.block_m).sum()), r
assert 0 < int(aligned[1].num_padded) < int(aligned[0].num_padded) and len(aligned) == 3
print("expert parallel ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton not installed (the test extra installs it)")
def test_expert_parallel_routes_through_the_fused_kernel(monkeypatch):
    """(The models end to end through the kernel: tests/test_fused_moe.py.)"""
    monkeypatch.setenv("TANDEM_MOE", "triton")
    assert "expert parallel ok" in run_interpreted(EXPERT_PARALLEL)


@pytest.mark.parametrize("preset, total, active", [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("mixtral-8x7b", 46.7e9, 12.9e9)])
def test_presets_have_the_published_parameter_counts(preset, total, active):
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active per token (its model card); Mixtral-8x7B: 46.7B,
    12.9B active (both count the embedding and the head whole). Counted from the weights the family
    loads (shapes only, on the meta device)."""
    from tandem.model.models.moe_block import MoEDecoder
    from tandem.model.presets import PRESETS as CONFIGS
    from tandem.model.registry import model_class

    cfg = CONFIGS[preset]
    family: type[MoEDecoder] = model_class(cfg.architecture)
    settings = family.family_settings(cfg)
    weights = load_weights(cfg, lambda name, shape, part: torch.empty(shape, device="meta"), settings, names=family.names)
    tensors = [weights.embed, weights.norm] + ([] if cfg.tie_word_embeddings else [weights.lm_head])
    for layer in weights.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        tensors += [t for t in vars(layer.experts).values() if isinstance(t, torch.Tensor)]
    count = sum(t.numel() for t in tensors)
    per_expert = sum(layer.experts.w13[0].numel() + layer.experts.w2[0].numel() for layer in weights.layers)
    unused = (settings.num_experts - settings.top_k) * per_expert  # the experts a token does not route to
    assert round(count / 1e9, 1) == total / 1e9
    assert abs((count - unused) - active) < 0.06e9  # the cards round 3.35B down, 12.88B up
