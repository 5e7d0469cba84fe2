"""tandem's paged attention as an attention function of transformers (``AttentionInterface``).

transformers' attention modules compute q, k and v (projections, norms, rotary) and hand them to
the function their config's ``_attn_implementation`` names, with the layer's scale, sliding window
and soft-cap as keyword arguments. Registered as ``"tandem"``, that function writes k and v into the
layer's paged KV cache at the step's slots and attends q through ``StepAttention``, so one flat batch
of many sequences runs as if it were one sequence of ``[1, heads, T, head_dim]``.

Each attention module of a loaded model holds that model's ``StepContext`` (``module.tandem_context``):
its layers' ``AttentionSpec`` and, during a step, the KV cache and the step's attention. Before the
first step the context records what every layer passes instead (``LayerCall``), which is how the
backend learns each layer's spec and refuses what it cannot route (see ``spec_of``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tandem.model.attention.base import AttentionSpec, StepAttention
from tandem.model.layers.kv import store_kv

ATTENTION_NAME = "tandem"

# keyword arguments transformers' layers pass along that do not change what attention computes
_NEUTRAL = frozenset({"position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states",
                      "position_embeddings", "cache", "past_key_values", "layer_idx", "return_dict"})
# what ``spec_of`` reads: the spec's fields, and two that must have their plain values
_HANDLED = frozenset({"scaling", "sliding_window", "softcap", "dropout", "is_causal"})


@dataclass
class LayerCall:
    """What one attention module passed to the attention function in a recorded forward."""

    layer: int | None
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    with_mask: bool
    kwargs: dict[str, Any]


@dataclass
class StepContext:
    """Per model: the layers' specs, and what the current step attends with."""

    specs: tuple[AttentionSpec, ...] = ()
    kv_cache: torch.Tensor | None = None  # [layers, 2, slots, kv_heads, head_dim]
    attn: StepAttention | None = None
    recorded: list[LayerCall] | None = None  # not None: record calls (no cache yet), see ``tandem_attention``


def tandem_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (this step's tokens) -> ([1, T, Hq, D], None)."""
    ctx: StepContext = module.tandem_context
    if ctx.recorded is not None:
        return _record(ctx.recorded, module, query, key, value, attention_mask, kwargs), None
    layer = module.layer_idx
    n_heads, n_tokens, head_dim = query.shape[1:]
    cache = ctx.kv_cache[layer]
    spec = ctx.specs[layer]
    store_kv(cache, key[0].transpose(0, 1), value[0].transpose(0, 1), ctx.attn.inputs.slot_mapping, spec.k_scale,
             spec.v_scale)
    out = ctx.attn.attend(query[0].transpose(0, 1), cache, spec)
    return out.view(1, n_tokens, n_heads, head_dim), None


def _record(recorded: list[LayerCall], module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """Note the call; attend each token to itself only, so that in the recording forward a token's
    output depends on nothing but its own id and position (what ``transformers_probe`` checks)."""
    passed = {k: v for k, v in kwargs.items() if k not in _NEUTRAL}
    passed.setdefault("is_causal", getattr(module, "is_causal", True))  # where transformers' own functions look
    recorded.append(LayerCall(getattr(module, "layer_idx", None), query.shape[1], key.shape[1], key.shape[-1],
                              value.shape[-1], attention_mask is not None, passed))
    group = query.shape[1] // max(key.shape[1], 1)
    return value.repeat_interleave(group, dim=1).transpose(1, 2)


def spec_of(call: LayerCall, sliding_expected: bool) -> AttentionSpec:
    """The layer's ``AttentionSpec`` from what it passed; NotImplementedError for anything the paged
    backends cannot apply (the mask is never used: tandem masks by sequence and causality itself)."""
    where = f"layer {call.layer}"
    if call.with_mask:
        raise NotImplementedError(f"{where} builds its own attention mask (custom masking such as ALiBi, prefix-LM "
                                  "or chunked attention), which tandem's paged attention cannot apply")
    if call.kwargs.get("is_causal", True) is False:
        raise NotImplementedError(f"{where} attends bidirectionally (is_causal=False); tandem runs causal decoders")
    if call.kwargs.get("dropout"):
        raise NotImplementedError(f"{where} applies attention dropout in evaluation")
    unknown = sorted(k for k, v in call.kwargs.items() if k not in _HANDLED and v is not None)
    if unknown:
        raise NotImplementedError(f"{where} passes {unknown} to its attention function (attention sinks, position "
                                  "biases or other custom attention), which tandem's paged attention cannot apply")
    window = call.kwargs.get("sliding_window")
    if sliding_expected and not window:
        raise NotImplementedError(f"{where} is a sliding-window layer that applies its window only through the "
                                  "attention mask, which tandem does not use")
    scale = call.kwargs.get("scaling")
    return AttentionSpec(1.0 / math.sqrt(call.head_dim) if scale is None else float(scale),
                         int(window) if window else None, call.kwargs.get("softcap"))


def register() -> None:
    """Make ``attn_implementation="tandem"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, tandem_attention)
