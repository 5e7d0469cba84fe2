"""Qwen's mixtures of experts: Qwen3-MoE (``Qwen3MoeForCausalLM``: Qwen3-30B-A3B, Qwen3-235B-A22B)
and Qwen2-MoE (``Qwen2MoeForCausalLM``: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B), as transformers computes
them.

Attention is the dense family's (Qwen3: per-head q/k RMSNorm; Qwen2: q/k/v biases). Each layer's MLP
is a sparse MoE block (``moe_block``) unless the layer is listed in ``mlp_only_layers`` or falls
between two of every ``decoder_sparse_step`` layers (layer i has experts when (i + 1) % step == 0),
where it is a dense gated MLP of ``intermediate_size``. Routing: softmax over the router's logits,
the top ``num_experts_per_tok`` experts, their weights rescaled to sum to one when
``norm_topk_prob``. Qwen2-MoE adds a shared expert (``shared_expert_intermediate_size``) to every
token, scaled by sigmoid(``shared_expert_gate`` x); Qwen3-MoE has none.

Settings read only in training, fine to leave unread at inference: ``output_router_logits`` and
``router_aux_loss_coef`` (the load-balancing loss), ``attention_dropout``, ``initializer_range``."""
from __future__ import annotations

from typing import Any

from tandem.model.model_config import ModelConfig, refuse_settings
from tandem.model.models.moe_block import QWEN_NAMES, MoEDecoder, MoESettings, experts_of, required

QWEN2_MOE = "Qwen2MoeForCausalLM"
# Qwen2-MoE's q/k/v projections have biases unless config.json says otherwise (tandem implies them)
_QWEN2_MUST: dict[str, Any] = {"qkv_bias": True}


def qwen_moe_settings(cfg: ModelConfig) -> MoESettings:
    """The family's MoE fields, parsed and checked (transformers' defaults where config.json is silent)."""
    hf = cfg.hf
    qwen2 = cfg.architecture == QWEN2_MOE
    if qwen2:
        refuse_settings(hf, _QWEN2_MUST)
    shape = experts_of(cfg)  # sparse layers: transformers' rule from mlp_only_layers and decoder_sparse_step
    return MoESettings(num_experts=shape.num_experts, top_k=shape.top_k,
                       renormalize=bool(hf.get("norm_topk_prob", False)),
                       expert_intermediate=shape.expert_intermediate,
                       sparse_layers=tuple(i in shape.sparse_layers for i in range(cfg.num_layers)),
                       shared_intermediate=required(hf, "shared_expert_intermediate_size") if qwen2 else 0)


class QwenMoeModel(MoEDecoder):
    """``MoEDecoder`` with Qwen's settings and checkpoint names (``mlp.experts.{e}.gate_proj`` ...)."""

    names = QWEN_NAMES
    family_settings = staticmethod(qwen_moe_settings)
