"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3): pre-norm decoder layers with GQA attention
(optional q/k/v bias, optional per-head q/k RMSNorm), rotary embeddings and a SiLU-gated MLP."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tandem.kernels import triton_available
from tandem.model.attention.base import AttentionSpec
from tandem.model.base import Getter, KVSpec, LayeredForward
from tandem.model.layers.kv import store_kv
from tandem.model.layers.mlp import silu_mul
from tandem.model.layers.norms import add_rms_norm, rms_norm
from tandem.model.layers.rotary import apply_rope, rope_cos_sin
from tandem.model.model_config import ModelConfig, refuse_settings
from tandem.model.models.decoder_parts import (ModelWeights, attention_weights, embedding_and_head,
                                               ignored_tensors, lm_logits, mlp_weights)
from tandem.model.quant.linear import Weight, linear, silu_gated_linear
from tandem.model.tp_layout import TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps

# What this forward does not implement, with the value that means "not used"
_MUST_BE_OFF: dict[str, Any] = {"attention_bias": False, "mlp_bias": False, "partial_rotary_factor": 1.0,
                                "attn_logit_softcapping": None, "final_logit_softcapping": None}
_ACTIVATIONS = ("silu", "swish")


def check_config(cfg: ModelConfig) -> None:
    refuse_settings(cfg.hf, _MUST_BE_OFF)
    act = cfg.hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"config.json sets hidden_act={act!r}; only {_ACTIVATIONS} are implemented "
                                  f"for {cfg.architecture}")
    kinds = set(cfg.hf.get("layer_types") or [])
    if kinds - {"full_attention"}:
        raise NotImplementedError(f"config.json sets layer_types {sorted(kinds)}; {cfg.architecture} runs full "
                                  "attention per layer (or one sliding_window for every layer, Mistral-style)")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Weight  # [q + 2 kv, hidden]
    o: Weight
    post_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def _layer(cfg: ModelConfig, get: Getter, i: int, tp: TPLayout) -> LayerWeights:
    p = f"model.layers.{i}."
    h, d = cfg.hidden_size, cfg.head_dim
    qkv, o, qkv_bias = attention_weights(cfg, get, p, tp, bias=cfg.qkv_bias)
    gate_up, down = mlp_weights(cfg, get, p, tp)
    return LayerWeights(
        input_norm=get(f"{p}input_layernorm.weight", (h,), None), qkv=qkv, o=o,
        post_norm=get(f"{p}post_attention_layernorm.weight", (h,), None), gate_up=gate_up, down=down,
        qkv_bias=qkv_bias,
        q_norm=get(f"{p}self_attn.q_norm.weight", (d,), None) if cfg.qk_norm else None,
        k_norm=get(f"{p}self_attn.k_norm.weight", (d,), None) if cfg.qk_norm else None,
    )


def load_weights(cfg: ModelConfig, get: Getter, tp: TPLayout = TPLayout()) -> ModelWeights[LayerWeights]:
    """``cfg`` is the whole model's config; the weights are rank ``tp.rank``'s parts of it."""
    embed, lm_head = embedding_and_head(cfg, get, tp)
    layers = [_layer(cfg, get, i, tp) for i in range(cfg.num_layers)]
    norm = get("model.norm.weight", (cfg.hidden_size,), None)
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


class LlamaModel(LayeredForward):
    """Stateless apart from weights and rotary tables; the KV cache is passed in.

    Under tensor parallelism ``config`` is the rank's share (``TPLayout.local_config``: its heads, KV
    heads and MLP width), the weights are its shards, and ``comm`` holds the collectives."""

    @classmethod
    def load(cls, config: ModelConfig, get: Getter, tp: TPLayout, max_positions: int,
             comm: SingleDevice | TensorParallelOps) -> LlamaModel:
        check_config(config)
        return cls(tp.local_config(config), load_weights(config, get, tp), max_positions, comm)

    ignored_tensors = staticmethod(ignored_tensors)

    def __init__(self, config: ModelConfig, weights: ModelWeights[LayerWeights], max_positions: int,
                 comm: SingleDevice | TensorParallelOps | None = None) -> None:
        self.config = config
        self.weights = weights
        self.comm = comm or SingleDevice()
        device, dtype = weights.embed.device, weights.embed.dtype
        self.device, self.dtype = device, dtype
        self.max_positions = max_positions
        cos, sin = rope_cos_sin(config.head_dim, config.rope_theta, config.rope_scaling, max_positions, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        spec = AttentionSpec(1.0 / math.sqrt(config.head_dim), config.sliding_window)
        self.kv_spec = KVSpec(config.num_kv_heads, config.head_dim, (spec,) * config.num_layers)
        # fused Triton kernels on CUDA; the torch ops they reproduce everywhere else
        self.fused = device.type == "cuda" and triton_available()
        if self.fused:
            from tandem.kernels import fused

            self._add_norm, self._silu_mul, self._rope_store = fused.add_rms_norm, fused.silu_mul, fused.rope_store_kv_
        else:
            self._add_norm, self._silu_mul = add_rms_norm, silu_mul

    # The forward in pieces (``LayeredCausalLM``), so that everything between two attentions can be
    # captured as one graph; ``LayeredForward.forward`` chains them.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.comm.embed(input_ids, self.weights.embed)

    def before_attention(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                         cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to its attention: norm (adding the residual), QKV, q/k norms, rotary; K and V
        go to the cache at ``slot_mapping``. Returns q [T, Hq, D] and the residual."""
        layer, cfg = self.weights.layers[i], self.config
        hidden, residual = self._add_norm(hidden, residual, layer.input_norm, cfg.rms_norm_eps)
        qkv = linear(hidden, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        scales = self.kv_spec.layers[i].k_scale, self.kv_spec.layers[i].v_scale  # an fp8 cache's
        if self.fused:  # rotary and the K/V store in one pass
            return self._rope_store(q, k, v, positions, self.cos, self.sin, cache, slot_mapping, *scales), residual
        cos, sin = self.cos[positions], self.sin[positions]
        store_kv(cache, apply_rope(k, cos, sin), v, slot_mapping, *scales)
        return apply_rope(q, cos, sin), residual

    def after_attention(self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of layer i: output projection, norm (adding the residual), MLP."""
        layer = self.weights.layers[i]
        attn = self.comm.reduce(linear(attn_out, layer.o))
        hidden, residual = self._add_norm(attn, residual, layer.post_norm, self.config.rms_norm_eps)
        return self.comm.reduce(silu_gated_linear(linear(hidden, layer.gate_up), layer.down, self._silu_mul)), residual

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._add_norm(hidden, residual, self.weights.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(hidden, self.weights.lm_head, self.comm, out)
