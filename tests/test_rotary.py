"""Rotary variants against the installed transformers, bit for bit: inv_freq and the attention factor
against its ``ROPE_INIT_FUNCTIONS`` on random configs read back from config.json (both layouts), the
cos/sin tables against its rotary module, partial rotary against its ``apply_rotary_pos_emb``; the
position-dependent types refused past their length. Token parity through whole checkpoints: the
llama-yarn and llama-longrope entries of ``checkpoints.ARCHS`` in test_hf_parity.py."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from checkpoints import hf_prefill_logits

from tandem import LLM
from tandem.model.layers.rotary import apply_rope, rope_cos_sin, rope_inv_freq
from tandem.model.model_config import (ModelConfig, load_model_config, model_config_from_dict,
                                       requested_max_model_len, rotary_dim)

KINDS = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
CPU = torch.device("cpu")


def _rope_parameters(kind: str, rng: random.Random, dim: int, max_len: int) -> dict:
    """Fresh parameters of one type: optional fields sometimes left out so the defaults are used too."""
    original = rng.randint(16, max_len)
    maybe = lambda value: value if rng.random() < 0.5 else None  # noqa: E731
    extra = {
        "default": lambda: {},
        "linear": lambda: dict(factor=rng.uniform(1, 16)),
        "dynamic": lambda: dict(factor=rng.uniform(1, 16)),
        "llama3": lambda: dict(factor=rng.uniform(1, 16), low_freq_factor=rng.uniform(0.5, 2),
                               high_freq_factor=rng.uniform(2.5, 8), original_max_position_embeddings=original),
        # factor None: derived from max_position_embeddings / original_max_position_embeddings
        "yarn": lambda: dict(factor=maybe(rng.uniform(1, 40)), original_max_position_embeddings=original,
                             beta_fast=maybe(rng.uniform(2, 64)), beta_slow=maybe(rng.uniform(0.5, 2)),
                             truncate=rng.choice([True, False, None]), attention_factor=maybe(rng.uniform(0.5, 2)),
                             mscale=maybe(rng.uniform(0.5, 2)), mscale_all_dim=maybe(rng.uniform(0.5, 2))),
        "longrope": lambda: dict(factor=maybe(rng.uniform(1, 32)), original_max_position_embeddings=original,
                                 attention_factor=maybe(rng.uniform(0.5, 2)),
                                 short_factor=[rng.uniform(1, 8) for _ in range(dim // 2)],
                                 long_factor=[rng.uniform(1, 64) for _ in range(dim // 2)]),
    }[kind]()
    # None means "not set", except where transformers requires the key (yarn's factor)
    return {k: v for k, v in extra.items() if v is not None or (kind, k) == ("yarn", "factor")}


def _random_config(kind: str, seed: int, max_len: int = 200_000) -> transformers.LlamaConfig:
    rng = random.Random(f"{kind}-{seed}")
    head_dim = rng.choice([16, 24, 32, 64, 80, 128, 256])
    # transformers' Llama ignores partial_rotary_factor for plain rope and applies it for the others
    partial = 1.0 if kind in ("default", "llama3") else rng.choice([1.0, 1.0, 0.5, 0.25])
    theta = rng.choice([10000.0, 500000.0, 1e6, rng.uniform(100, 1e7)])
    rope = dict(rope_type=kind, rope_theta=theta, **_rope_parameters(kind, rng, int(head_dim * partial), max_len))
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    return transformers.LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=4 * head_dim, num_attention_heads=4,
        head_dim=head_dim, intermediate_size=8, num_hidden_layers=1,
        max_position_embeddings=rng.choice([512, 4096, 32768, rng.randint(100, max_len)]), rope_parameters=rope)


def _as_legacy(cfg: dict) -> dict:
    """The transformers 4.x layout of the same config: rope_theta, partial_rotary_factor and
    rope_scaling (with the older "type" key) at the top level."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    return cfg


def _ours(config: transformers.LlamaConfig, tmp_path: Path, legacy: bool = False) -> ModelConfig:
    """tandem's config of what ``config.save_pretrained`` writes (rewritten to the 4.x layout if ``legacy``)."""
    config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    return model_config_from_dict(_as_legacy(cfg) if legacy else cfg)


def _reference(kind: str, config: transformers.LlamaConfig) -> tuple[torch.Tensor, float]:
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, CPU)


@pytest.mark.parametrize("kind", KINDS)
def test_inv_freq_and_attention_factor_equal_transformers(kind, tmp_path):
    for seed in range(16):
        config = _random_config(kind, seed)
        ref_inv_freq, ref_attention = _reference(kind, config)
        for legacy in (False, True):
            cfg = _ours(config, tmp_path, legacy)
            inv_freq, attention = rope_inv_freq(rotary_dim(cfg), cfg.rope_theta, cfg.rope_scaling)
            assert torch.equal(inv_freq, ref_inv_freq), (seed, legacy, config.rope_parameters)
            assert attention == ref_attention, (seed, legacy, config.rope_parameters)


@pytest.mark.parametrize("kind", KINDS)
def test_tables_equal_transformers_rotary_module(kind, tmp_path):
    """At positions of sequences within the type's exact length (the dynamic and longrope limit)."""
    for seed in range(4):
        config = _random_config(kind, seed, max_len=8192)
        cfg = _ours(config, tmp_path)
        length = requested_max_model_len(cfg, None, allow_long=False)
        gen = torch.Generator().manual_seed(seed)
        positions = torch.cat([torch.randint(0, length, (200,), generator=gen), torch.tensor([length - 1])])
        ref_cos, ref_sin = LlamaRotaryEmbedding(config)(torch.randn(1, 2), positions[None])
        cos, sin = rope_cos_sin(rotary_dim(cfg), cfg.rope_theta, cfg.rope_scaling, length, CPU)
        assert ref_cos.shape[-1] == cos.shape[-1] == rotary_dim(cfg)
        assert torch.equal(cos[positions], ref_cos[0]) and torch.equal(sin[positions], ref_sin[0])


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_transformers_changes_position_dependent_types_past_their_length(kind, tmp_path):
    """Why tandem stops there: one position past it, transformers' tables for the same positions change."""
    config = _random_config(kind, 1, max_len=4096)
    config.rope_parameters["factor"] = 4.0
    cfg = _ours(config, tmp_path)
    length = requested_max_model_len(cfg, None, allow_long=False)
    cos, _ = rope_cos_sin(rotary_dim(cfg), cfg.rope_theta, cfg.rope_scaling, length, CPU)
    rotary = LlamaRotaryEmbedding(config)
    within, _ = rotary(torch.randn(1, 2), torch.arange(length)[None])
    past, _ = rotary(torch.randn(1, 2), torch.arange(length + 1)[None])
    assert torch.equal(within[0], cos)
    assert not torch.allclose(past[0, :length], cos, atol=1e-3)


def test_partial_rotary_equals_transformers(tmp_path):
    """The first rotary_dim dims rotate, the rest pass through (StableLM / Phi style)."""
    config = _random_config("yarn", 3, max_len=4096)
    config.rope_parameters["partial_rotary_factor"] = 0.25
    cfg = _ours(config, tmp_path)
    rot = rotary_dim(cfg)
    assert rot == cfg.head_dim // 4
    cos, sin = rope_cos_sin(rot, cfg.rope_theta, cfg.rope_scaling, 300, CPU)
    gen = torch.Generator().manual_seed(4)
    positions = torch.randint(0, 300, (7,), generator=gen)
    q, k = torch.randn(2, 7, 4, cfg.head_dim, generator=gen)
    ref_q, ref_k = apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos[positions], sin[positions])
    assert torch.equal(apply_rope(q, cos[positions], sin[positions]), torch.cat([ref_q, q[..., rot:]], -1))
    assert torch.equal(apply_rope(k, cos[positions], sin[positions]), torch.cat([ref_k, k[..., rot:]], -1))


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_position_dependent_types_refuse_beyond_their_length(kind, tmp_path):
    config = _random_config(kind, 2, max_len=4096)
    config.max_position_embeddings = 8192
    cfg = _ours(config, tmp_path)
    limit = cfg.max_position_embeddings if kind == "dynamic" else config.rope_parameters[
        "original_max_position_embeddings"]
    assert requested_max_model_len(cfg, None, allow_long=False) == limit  # the default stops there
    assert requested_max_model_len(cfg, limit, allow_long=False) == limit
    for ask in (limit + 1, 2 * limit):
        with pytest.raises(ValueError, match=rf"max_model_len={ask} .*'{kind}'.* {limit} positions"):
            requested_max_model_len(cfg, ask, allow_long=True)  # allowing long lengths does not lift it
        with pytest.raises(ValueError, match=rf"'{kind}'"):
            rope_cos_sin(rotary_dim(cfg), cfg.rope_theta, cfg.rope_scaling, ask, CPU)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_fixed_types_have_no_length_limit(kind, tmp_path):
    cfg = _ours(_random_config(kind, 5, max_len=4096), tmp_path)
    assert requested_max_model_len(cfg, None, allow_long=False) == cfg.max_position_embeddings
    assert requested_max_model_len(cfg, 3 * cfg.max_position_embeddings, allow_long=True) == \
        3 * cfg.max_position_embeddings


def test_longrope_checkpoint_refuses_max_model_len_past_its_length_at_load(checkpoint_dir):
    path = checkpoint_dir("llama-longrope")
    with pytest.raises(ValueError, match=r"'longrope'.* 256 positions"):
        LLM(str(path), dtype="float32", device="cpu", max_model_len=257)
    assert load_model_config(path).rope_scaling["factor"] == 1024 / 256  # derived, as transformers does


@pytest.mark.parametrize("rope", [{"rope_type": "proportional", "rope_theta": 1e4},
                                  {"type": "su", "short_factor": [1.0], "long_factor": [1.0]},
                                  {"rope_type": "mrope", "mrope_section": [2, 2, 4]}])
def test_unsupported_rope_types_are_refused_by_name(rope):
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=64, num_attention_heads=4,
               num_hidden_layers=1, intermediate_size=8, rope_scaling=rope)
    name = rope.get("rope_type", rope.get("type"))
    with pytest.raises(NotImplementedError, match=rf"rope scaling type '{name}' is not supported"):
        model_config_from_dict(cfg)


def test_longrope_factor_list_of_the_wrong_length_is_refused():
    scaling = dict(rope_type="longrope", short_factor=[1.0] * 5, long_factor=[1.0] * 5, factor=2.0,
                   original_max_position_embeddings=64)
    with pytest.raises(ValueError, match="short_factor has 5 entries; .* needs 8"):
        rope_cos_sin(16, 10000.0, scaling, 64, CPU)


@pytest.mark.parametrize("arch", ["llama-yarn", "llama-longrope"])
def test_the_scaling_changes_the_checkpoints_logits(checkpoint_dir, tmp_path, arch):
    """The parity tests of these checkpoints would catch a loader that ignored their scaling."""
    plain = tmp_path / "plain"
    shutil.copytree(checkpoint_dir(arch), plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(cfg))
    ids = list(range(3, 63))
    scaled, unscaled = hf_prefill_logits(checkpoint_dir(arch), ids), hf_prefill_logits(plain, ids)
    assert (scaled[-1] - unscaled[-1]).norm() > 0.1 * scaled[-1].norm()
