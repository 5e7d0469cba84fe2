"""The Llama-family forward (Llama 2/3, Mistral, Qwen2, Qwen3) over one flat token batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.model.attention import StepAttention
from tandem.kernels import triton_available
from tandem.model import layers
from tandem.model.layers import apply_rope, rms_norm, rope_cos_sin, store_kv
from tandem.model.model_config import ModelConfig
from tandem.model.tp_ops import SingleDevice, TensorParallelOps


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, hidden]
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied


class LlamaModel:
    """Stateless apart from weights and rotary tables; the KV cache is passed in.

    Under tensor parallelism ``config`` is the rank's share (``TPLayout.local_config``: its heads, KV
    heads and MLP width), the weights are its shards, and ``comm`` holds the collectives."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, max_positions: int,
                 comm: SingleDevice | TensorParallelOps | None = None) -> None:
        self.config = config
        self.weights = weights
        self.comm = comm or SingleDevice()
        device, dtype = weights.embed.device, weights.embed.dtype
        self.device, self.dtype = device, dtype
        self.max_positions = max_positions
        cos, sin = rope_cos_sin(config.head_dim, config.rope_theta, config.rope_scaling, max_positions, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        # fused Triton kernels on CUDA; the torch ops they reproduce everywhere else
        self.fused = device.type == "cuda" and triton_available()
        if self.fused:
            from tandem.kernels import fused

            self._add_norm, self._silu_mul, self._rope_store = fused.add_rms_norm, fused.silu_mul, fused.rope_store_kv_
        else:
            self._add_norm, self._silu_mul = layers.add_rms_norm, layers.silu_mul

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attn: StepAttention) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, slots, kv_heads, head_dim] -> hidden [T, H]."""
        hidden, residual = self.embed(input_ids), None
        for i in range(self.config.num_layers):
            q, residual = self.before_attention(i, hidden, residual, positions, kv_cache[i], attn.inputs.slot_mapping)
            hidden, residual = self.after_attention(i, attn.attend(q, kv_cache[i]), residual)
        return self.final_norm(hidden, residual)

    # The forward in pieces, so that everything between two attentions can be captured as one graph.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.comm.embed(input_ids, self.weights.embed)

    def before_attention(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                         cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to its attention: norm (adding the residual), QKV, q/k norms, rotary; K and V
        go to the cache at ``slot_mapping``. Returns q [T, Hq, D] and the residual."""
        layer, cfg = self.weights.layers[i], self.config
        hidden, residual = self._add_norm(hidden, residual, layer.input_norm, cfg.rms_norm_eps)
        qkv = F.linear(hidden, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        if self.fused:  # rotary and the K/V store in one pass
            return self._rope_store(q, k, v, positions, self.cos, self.sin, cache, slot_mapping), residual
        cos, sin = self.cos[positions], self.sin[positions]
        store_kv(cache, apply_rope(k, cos, sin), v, slot_mapping)
        return apply_rope(q, cos, sin), residual

    def after_attention(self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of layer i: output projection, norm (adding the residual), MLP."""
        layer = self.weights.layers[i]
        attn = self.comm.reduce(F.linear(attn_out, layer.o))
        hidden, residual = self._add_norm(attn, residual, layer.post_norm, self.config.rms_norm_eps)
        return self.comm.reduce(F.linear(self._silu_mul(F.linear(hidden, layer.gate_up)), layer.down)), residual

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._add_norm(hidden, residual, self.weights.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, V] in the model's dtype: the sampler widens bf16 as it reads (a float32 copy of every
        row would cost a pass over the logits). ``out``: where to write them (CUDA graphs share one
        buffer, so each captured batch size does not keep logits of its own)."""
        if out is None:
            return self.comm.gather_logits(F.linear(hidden, self.weights.lm_head))
        if self.comm.size == 1:
            return torch.matmul(hidden, self.weights.lm_head.t(), out=out)
        return out.copy_(self.comm.gather_logits(F.linear(hidden, self.weights.lm_head)))
