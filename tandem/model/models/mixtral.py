"""Mixtral (``MixtralForCausalLM``: Mixtral-8x7B, Mixtral-8x22B), as transformers computes it.

Llama's attention (GQA, rotary, no biases), with a sliding window over every layer when config.json
sets ``sliding_window`` (as Mistral: the attention backends' ``AttentionSpec.sliding_window``); every
layer's MLP is a sparse MoE block (``moe_block``) of ``num_local_experts`` experts of
``intermediate_size``: softmax over the router's logits, the top ``num_experts_per_tok`` experts,
their weights always rescaled to sum to one. Hub checkpoints name the block ``block_sparse_moe`` with
experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); transformers' fused layout names it ``mlp``.

Settings read only in training, fine to leave unread at inference: ``router_jitter_noise``
(transformers scales the hidden states by noise only in training mode), ``output_router_logits`` and
``router_aux_loss_coef`` (the load-balancing loss), ``attention_dropout``, ``initializer_range``."""
from __future__ import annotations

from tandem.model.model_config import ModelConfig
from tandem.model.models.moe_block import MIXTRAL_NAMES, MoEDecoder, MoESettings, experts_of


def mixtral_settings(cfg: ModelConfig) -> MoESettings:
    """The family's MoE fields, parsed and checked: every layer has experts."""
    shape = experts_of(cfg)
    return MoESettings(num_experts=shape.num_experts, top_k=shape.top_k, renormalize=True,
                       expert_intermediate=shape.expert_intermediate, sparse_layers=(True,) * cfg.num_layers)


class MixtralModel(MoEDecoder):
    """``MoEDecoder`` with Mixtral's settings and checkpoint names."""

    names = MIXTRAL_NAMES
    family_settings = staticmethod(mixtral_settings)
