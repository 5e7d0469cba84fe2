"""What the roofline floor and the memory plan count for a mixture-of-experts model, checked against
the parameters transformers' own Qwen3-MoE and Mixtral classes build from the same configs."""
import dataclasses
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from tandem.bench.roofline import FloorModel
from tandem.bench.step_log import StepRecord
from tandem.kernels.moe_align import workspace_bytes
from tandem.model.model_config import model_config_from_dict
from tandem.model.moe_shape import moe_shape
from tandem.model.presets import preset_config
from tandem.worker.memory import moe_workspace_bytes

SMALL = dict(vocab_size=300, hidden_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
             head_dim=12, intermediate_size=80)


def _configs():
    qwen = Qwen3MoeConfig(**SMALL, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4,
                          decoder_sparse_step=2, mlp_only_layers=[3])  # sparse: layer 1 only
    qwen_all = Qwen3MoeConfig(**SMALL, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4)
    mixtral = MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2)
    return [(qwen, "Qwen3MoeForCausalLM", (1,)), (qwen_all, "Qwen3MoeForCausalLM", (0, 1, 2, 3, 4)),
            (mixtral, "MixtralForCausalLM", (0, 1, 2, 3, 4))]


def _ours(hf_cfg, arch: str):
    cfg = model_config_from_dict({**hf_cfg.to_dict(), "architectures": [arch]})
    return dataclasses.replace(cfg, qk_norm=arch.startswith("Qwen3"))  # what the native family implies


@pytest.mark.parametrize("index", range(3))
def test_moe_shape_and_floor_match_transformers_parameters(index):
    hf_cfg, arch, sparse = _configs()[index]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    params = dict(model.named_parameters())
    expert_numel = sum(p.numel() for n, p in params.items() if ".experts." in n)
    cfg = _ours(hf_cfg, arch)
    shape = moe_shape(cfg)
    assert shape.sparse_layers == sparse and shape.top_k == hf_cfg.num_experts_per_tok
    assert expert_numel == len(sparse) * shape.num_experts * shape.expert_params
    floor = FloorModel(cfg, torch.float32)
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # every parameter counted once: the always-read part (dense layers, routers, attention, norms)
    # and all experts, when a step's tokens touch them all
    total = sum(p.numel() for p in params.values())
    assert floor.layer_params + embed + shape.num_experts * floor.expert_params == total
    assert floor.expert_params * shape.num_experts == expert_numel


def _rec(tokens: int) -> StepRecord:
    return StepRecord(0, num_tokens=tokens, num_seqs=tokens, num_decode=tokens, num_sampled=tokens, kv_tokens=tokens,
                      attn_pairs=tokens, t_begin=0, schedule_s=0, build_s=0, submit_s=0)


def test_floor_counts_the_experts_a_step_touches():
    hf_cfg, arch, _ = _configs()[1]
    cfg = _ours(hf_cfg, arch)
    floor, shape = FloorModel(cfg, torch.bfloat16), moe_shape(cfg)
    dense = FloorModel(dataclasses.replace(cfg, hf={}), torch.bfloat16)  # the same shapes read as a dense model
    one, many = floor.step_cost(_rec(1)), floor.step_cost(_rec(4096))
    experts_bytes = floor.expert_params * 2  # one expert over all sparse layers, bf16
    kv_bytes = 2 * cfg.num_layers * floor.layer_token_bytes  # per layer: its context of one read, its K/V written
    always = (floor.layer_params + floor.head_params + cfg.hidden_size) * 2
    # one token reads k experts per sparse layer, thousands read (almost) every expert
    assert one.bytes - always - kv_bytes == pytest.approx(shape.top_k * experts_bytes)
    assert floor.experts_read(4096) == pytest.approx(shape.num_experts)
    assert many.bytes > one.bytes + (shape.num_experts - shape.top_k - 0.01) * experts_bytes
    # FLOPs: k experts per token, whatever the batch (and attention's one score per layer)
    attention = 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    linear = 2 * (floor.layer_params + shape.top_k * floor.expert_params + floor.head_params)
    assert one.flops == pytest.approx(linear + attention)
    assert dense.moe is None and floor.layer_params < dense.layer_params  # experts are not dense MLPs


def test_expected_distinct_experts_is_the_uniform_routing_mean():
    shape = moe_shape(_ours(_configs()[0][0], "Qwen3MoeForCausalLM"))
    rng = random.Random(0)
    for tokens in (1, 3, 10):
        draws = [len({e for _ in range(tokens) for e in rng.sample(range(shape.num_experts), shape.top_k)})
                 for _ in range(3000)]
        assert sum(draws) / len(draws) == pytest.approx(shape.expected_distinct_experts(tokens), rel=0.02)


def test_memory_plan_reserves_the_moe_workspace():
    assert moe_workspace_bytes(preset_config("random:tiny"), 8192, torch.bfloat16) == 0
    hf_cfg, arch, _ = _configs()[2]
    cfg = _ours(hf_cfg, arch)
    assert moe_workspace_bytes(cfg, 2048, torch.bfloat16) == workspace_bytes(2048, 2, 8, 48, 80, 2)
    assert moe_workspace_bytes(cfg, 2048, torch.float32) > moe_workspace_bytes(cfg, 1024, torch.float32)
