"""The Gemma family: Gemma 2 and Gemma 3 text-only checkpoints (``Gemma2ForCausalLM``,
``Gemma3ForCausalLM``), as transformers' modeling code computes them.

What sets them apart from the Llama family: the embedding is scaled by sqrt(hidden_size) (rounded to
the model dtype); every RMSNorm scales by (1 + w) in float32 and rounds last; each layer norms its
attention output and its MLP output before adding them to the stream (four norms a layer); the MLP
gates with GELU-tanh; the attention scale is query_pre_attn_scalar ** -0.5; sliding-window and global
layers interleave (``layer_types``, or the architecture's pattern), each kind with its own rotary
base (Gemma 3: ``rope_local_base_freq`` for sliding layers, ``rope_theta`` and its scaling for global
ones); Gemma 2 soft-caps attention scores (cap * tanh(s / cap)) and both may soft-cap the final
logits; Gemma 3 norms q and k per head.

On CUDA, rotary and the K/V store take the fused kernel the Llama family uses (the same arithmetic as
``apply_rope`` + ``store_kv``), and the norms and the MLP's GELU-tanh * up take Gemma's own kernels
(``tandem.kernels.gemma_fused``: Llama's add+RMSNorm rounds before it scales, Gemma's after). Between
two attentions a layer runs three norms around each add (a norm, the add to the stream, the next
norm), each trio one kernel: so ``after_attention`` hands on the MLP's output before its
post-feedforward norm, which the next ``before_attention`` (or ``final_norm``) applies. Elsewhere
(CPU, float64) the same pieces run on the torch layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tandem.kernels import triton_available
from tandem.model.attention.base import AttentionSpec
from tandem.model.base import Getter, KVSpec, LayeredForward
from tandem.model.layers.kv import store_kv
from tandem.model.layers.mlp import gelu_tanh_mul
from tandem.model.layers.norms import gemma_norm_factor, gemma_rms_norm
from tandem.model.layers.rotary import apply_rope, rope_cos_sin
from tandem.model.model_config import ModelConfig, refuse_settings, rope_of
from tandem.model.models.decoder_parts import (ModelWeights, attention_weights, embedding_and_head,
                                               ignored_tensors, lm_logits, mlp_weights)
from tandem.model.quant.linear import Weight, linear
from tandem.model.tp_layout import TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps

GEMMA2 = "Gemma2ForCausalLM"
# What this forward does not implement, with the value that means "not used"
_MUST_BE_OFF: dict[str, Any] = {"attention_bias": False, "use_bidirectional_attention": False}
_ACTIVATIONS = ("gelu_pytorch_tanh",)  # transformers' default for both (F.gelu(approximate="tanh"))
_LAYER_KINDS = ("sliding_attention", "full_attention")
# transformers' defaults where config.json is silent: Gemma 2 soft-caps, Gemma 3 does not
_SOFTCAP_DEFAULTS = {GEMMA2: (50.0, 30.0), "Gemma3ForCausalLM": (None, None)}
_LOCAL_THETA, _GEMMA3_GLOBAL_THETA = 10_000.0, 1_000_000.0

Rope = tuple[float, "dict[str, Any] | None"]  # (theta, scaling)


@dataclass(frozen=True)
class GemmaSettings:
    """The config fields this family reads beyond ``ModelConfig``'s generic ones."""

    scale: float  # query_pre_attn_scalar ** -0.5
    attn_softcap: float | None
    final_softcap: float | None
    local_rope: Rope  # sliding layers
    global_rope: Rope  # full-attention layers


def _global_rope(cfg: ModelConfig) -> Rope:
    hf = cfg.hf
    said = "rope_theta" in hf or "full_attention" in (hf.get("rope_parameters") or {})
    if cfg.architecture != GEMMA2 and not said:
        return _GEMMA3_GLOBAL_THETA, cfg.rope_scaling
    return cfg.rope_theta, cfg.rope_scaling


def _local_rope(cfg: ModelConfig) -> Rope:
    """Gemma 2: the one rope of every layer. Gemma 3: transformers 5's per-layer-type parameters, or
    4.x's ``rope_local_base_freq`` (which ``rope_scaling`` never applied to)."""
    if cfg.architecture == GEMMA2:
        return cfg.rope_theta, cfg.rope_scaling
    if "sliding_attention" in (cfg.hf.get("rope_parameters") or {}):
        return rope_of({**cfg.hf, "rope_scaling": None}, "sliding_attention")
    return float(cfg.hf.get("rope_local_base_freq", _LOCAL_THETA)), None


def gemma_settings(cfg: ModelConfig) -> GemmaSettings:
    """The family's fields, parsed and checked: NotImplementedError naming any it does not implement."""
    hf = cfg.hf
    refuse_settings(hf, _MUST_BE_OFF)
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"config.json sets hidden_activation={act!r}; only {_ACTIVATIONS} is implemented "
                                  f"for {cfg.architecture}")
    kinds = set(hf.get("layer_types") or ()) - set(_LAYER_KINDS)
    if kinds:
        raise NotImplementedError(f"config.json sets layer_types {sorted(kinds)}; {cfg.architecture} implements "
                                  f"{list(_LAYER_KINDS)}")
    all_global = bool(hf.get("layer_types")) and all(kind == "full_attention" for kind in hf["layer_types"])
    if cfg.sliding_window is None and not all_global:
        raise ValueError(f"config.json sets no sliding_window for {cfg.architecture}'s sliding layers")
    attn_default, final_default = _SOFTCAP_DEFAULTS[cfg.architecture]
    return GemmaSettings(
        scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers' Gemma 3 attention never applies attn_logit_softcapping, whatever the config says
        attn_softcap=hf.get("attn_logit_softcapping", attn_default) if cfg.architecture == GEMMA2 else None,
        final_softcap=hf.get("final_logit_softcapping", final_default),
        local_rope=_local_rope(cfg), global_rope=_global_rope(cfg))


@dataclass
class GemmaLayerWeights:
    input_norm: torch.Tensor  # each norm as its float32 factor (1 + w)
    qkv: Weight  # [q + 2 kv, hidden]
    o: Weight
    post_attention_norm: torch.Tensor
    pre_feedforward_norm: torch.Tensor
    post_feedforward_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight
    q_norm: torch.Tensor | None = None  # Gemma 3
    k_norm: torch.Tensor | None = None


def _layer(cfg: ModelConfig, get: Getter, i: int, tp: TPLayout) -> GemmaLayerWeights:
    p = f"model.layers.{i}."
    norm = lambda name, size=cfg.hidden_size: gemma_norm_factor(get(f"{p}{name}.weight", (size,), None))  # noqa: E731
    qkv, o, _ = attention_weights(cfg, get, p, tp)
    gate_up, down = mlp_weights(cfg, get, p, tp)
    return GemmaLayerWeights(
        input_norm=norm("input_layernorm"), qkv=qkv, o=o, post_attention_norm=norm("post_attention_layernorm"),
        pre_feedforward_norm=norm("pre_feedforward_layernorm"),
        post_feedforward_norm=norm("post_feedforward_layernorm"),
        gate_up=gate_up, down=down,
        q_norm=norm("self_attn.q_norm", cfg.head_dim) if cfg.qk_norm else None,
        k_norm=norm("self_attn.k_norm", cfg.head_dim) if cfg.qk_norm else None)


def load_weights(cfg: ModelConfig, get: Getter, tp: TPLayout = TPLayout()) -> ModelWeights[GemmaLayerWeights]:
    """``cfg`` is the whole model's config; the weights are rank ``tp.rank``'s parts of it."""
    embed, lm_head = embedding_and_head(cfg, get, tp)
    layers = [_layer(cfg, get, i, tp) for i in range(cfg.num_layers)]
    norm = gemma_norm_factor(get("model.norm.weight", (cfg.hidden_size,), None))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, f_in: torch.Tensor, f_out: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemma_rms_norm(stream, f_out), stream), stream = residual + gemma_rms_norm(x, f_in): the torch
    form of ``gemma_fused.norm_add_norm`` (the add in the model dtype, as transformers adds)."""
    stream = residual + gemma_rms_norm(x, f_in, eps)
    return gemma_rms_norm(stream, f_out, eps), stream


class GemmaModel(LayeredForward):
    """Stateless apart from weights and rotary tables; the KV cache is passed in. Under tensor
    parallelism ``config`` is the rank's share (its heads, KV heads and MLP width), as in the Llama
    family.

    The pieces carry the residual stream as Llama's do: ``before_attention`` gets the previous
    layer's MLP output (not yet through its post-feedforward norm, which it applies) and the stream
    before it, ``after_attention`` returns this layer's."""

    @classmethod
    def load(cls, config: ModelConfig, get: Getter, tp: TPLayout, max_positions: int,
             comm: SingleDevice | TensorParallelOps) -> GemmaModel:
        settings = gemma_settings(config)
        return cls(tp.local_config(config), settings, load_weights(config, get, tp), max_positions, comm)

    ignored_tensors = staticmethod(ignored_tensors)

    def __init__(self, config: ModelConfig, settings: GemmaSettings, weights: ModelWeights[GemmaLayerWeights],
                 max_positions: int, comm: SingleDevice | TensorParallelOps | None = None) -> None:
        self.config, self.settings, self.weights = config, settings, weights
        self.comm = comm or SingleDevice()
        self.device, self.dtype = weights.embed.device, weights.embed.dtype
        self.max_positions = max_positions
        # transformers multiplies by a float32 scalar tensor cast to the weights' dtype (55.4 -> 55.5 in bf16)
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5).to(device=self.device, dtype=self.dtype)
        windows = config.windows
        self.rope = self._rope_tables([settings.local_rope if w is not None else settings.global_rope for w in windows])
        self.kv_spec = KVSpec(config.num_kv_heads, config.head_dim,
                              tuple(AttentionSpec(settings.scale, w, settings.attn_softcap) for w in windows))
        # Triton kernels on CUDA; float64 keeps the torch layers (the kernels add and take GELU in float32)
        self.fused = self.device.type == "cuda" and triton_available() and self.dtype != torch.float64

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, on: bool) -> None:
        """The Triton kernels, or the torch layers they reproduce (tests set it under Triton's interpreter)."""
        self._fused = on
        if on:
            from tandem.kernels import fused, gemma_fused

            self._rope_store = fused.rope_store_kv_
            self._norm, self._norm_add_norm = gemma_fused.gemma_rms_norm, gemma_fused.norm_add_norm
            self._gelu_tanh_mul = gemma_fused.gelu_tanh_mul
        else:
            self._norm, self._norm_add_norm, self._gelu_tanh_mul = gemma_rms_norm, norm_add_norm, gelu_tanh_mul

    def _rope_tables(self, ropes: list[Rope]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of each layer in the model dtype; one table per distinct rope."""
        made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for theta, scaling in ropes:
            key = repr((theta, sorted((scaling or {}).items())))
            if key not in made:
                cos, sin = rope_cos_sin(self.config.head_dim, theta, scaling, self.max_positions, self.device)
                made[key] = cos.to(self.dtype), sin.to(self.dtype)
        return [made[repr((theta, sorted((scaling or {}).items())))] for theta, scaling in ropes]

    # The forward in pieces (``LayeredCausalLM``); ``LayeredForward.forward`` chains them.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.comm.embed(input_ids, self.weights.embed) * self.embed_scale

    def before_attention(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                         cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to its attention: the stream (residual + the previous layer's MLP output, normed
        here by that layer's post-feedforward norm), its norm, QKV, q/k norms, rotary; K and V go to the
        cache. Returns q [T, Hq, D] and the stream."""
        layer, cfg, eps = self.weights.layers[i], self.config, self.config.rms_norm_eps
        if residual is None:  # layer 0: the stream is the embedding
            normed, stream = self._norm(hidden, layer.input_norm, eps), hidden
        else:
            post_feedforward = self.weights.layers[i - 1].post_feedforward_norm
            normed, stream = self._norm_add_norm(hidden, residual, post_feedforward, layer.input_norm, eps)
        q, k, v = linear(normed, layer.qkv).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q, k = self._norm(q, layer.q_norm, eps), self._norm(k, layer.k_norm, eps)
        cos, sin = self.rope[i]
        scales = self.kv_spec.layers[i].k_scale, self.kv_spec.layers[i].v_scale  # an fp8 cache's
        if self.fused:
            return self._rope_store(q, k, v, positions, cos, sin, cache, slot_mapping, *scales), stream
        cos, sin = cos[positions], sin[positions]
        store_kv(cache, apply_rope(k, cos, sin), v, slot_mapping, *scales)
        return apply_rope(q, cos, sin), stream

    def after_attention(self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of layer i: output projection and its norm added to the stream, then the MLP
        after its first norm. Returns the MLP's output (reduced across ranks; its post-feedforward
        norm is the next piece's) and the stream before it."""
        layer, eps = self.weights.layers[i], self.config.rms_norm_eps
        attn = self.comm.reduce(linear(attn_out, layer.o))
        normed, stream = self._norm_add_norm(attn, residual, layer.post_attention_norm, layer.pre_feedforward_norm,
                                             eps)
        mlp = self.comm.reduce(linear(self._gelu_tanh_mul(linear(normed, layer.gate_up)), layer.down))
        return mlp, stream

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's post-feedforward norm, its add to the stream, the model's norm."""
        last = self.weights.layers[-1].post_feedforward_norm
        return self._norm_add_norm(hidden, residual, last, self.weights.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head's logits, soft-capped (cap * tanh(logits / cap), in place) where the config says."""
        logits = lm_logits(hidden, self.weights.lm_head, self.comm, out)
        cap = self.settings.final_softcap
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        return logits
