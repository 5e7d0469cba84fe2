"""A checkpoint's per-layer FP8 KV cache scales.

llm-compressor (compressed-tensors, ``kv_cache_scheme`` in the quantization_config) writes
``...layers.N.self_attn.k_scale`` and ``v_scale``, one float32 value each; older FP8 checkpoints
(AutoFP8) one ``self_attn.kv_scale`` that serves K and V alike. A cache value is x / scale. They
become the layers' ``AttentionSpec.k_scale`` / ``v_scale``, which an fp8 cache uses and a cache of
the model dtype ignores (it holds K and V themselves)."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

from tandem.model.base import CausalLM, KVSpec, LayeredCausalLM

logger = logging.getLogger(__name__)

SCALE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale)$")
# what kv_cache_scheme may say: static (calibrated) symmetric per-tensor e4m3
SUPPORTED_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def check_kv_cache_scheme(scheme: dict[str, Any] | None) -> None:
    """NotImplementedError naming any field of ``kv_cache_scheme`` other than static per-tensor FP8."""
    if scheme is None:
        return
    if not isinstance(scheme, dict):
        raise NotImplementedError(f"quantization_config's kv_cache_scheme {scheme!r} is not a scheme object")
    wrong = {k: scheme[k] for k, want in SUPPORTED_SCHEME.items() if k in scheme and scheme[k] != want}
    if wrong:
        raise NotImplementedError(f"quantization_config's kv_cache_scheme sets {wrong}: only static per-tensor FP8 "
                                  f"KV cache scales ({SUPPORTED_SCHEME}) are implemented")


def read_kv_scales(reader: Any, num_layers: int, required: bool) -> list[tuple[float, float]] | None:
    """(k_scale, v_scale) of every layer from a ``CheckpointReader``; None when the checkpoint has
    none and ``required`` is False. A layer without them, or a scale that is not one positive finite
    value, is a ValueError naming it."""
    found: dict[int, dict[str, float]] = {}
    for name in sorted(reader.files):
        match = SCALE_NAME.search(name)
        if match is None:
            continue
        tensor = reader.raw(name, None)
        value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else math.nan  # at load: no step waits
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{reader.path}: KV cache scale {name!r} must be one positive finite value, got "
                             f"shape {tuple(tensor.shape)} {tensor.flatten()[:4].tolist()}")
        found.setdefault(int(match[1]), {})[match[2]] = value
    if not found and not required:
        return None
    scales = []
    for i in range(num_layers):
        layer = found.get(i, {})
        k, v = layer.get("k_scale", layer.get("kv_scale")), layer.get("v_scale", layer.get("kv_scale"))
        if k is None or v is None:
            why = "its quantization_config sets kv_cache_scheme" if required else "other layers have them"
            raise ValueError(f"{reader.path}: layer {i} has no self_attn.k_scale / v_scale (or kv_scale) FP8 KV cache "
                             f"scales, and {why}")
        scales.append((k, v))
    return scales


def with_kv_scales(spec: KVSpec, scales: list[tuple[float, float]]) -> KVSpec:
    layers = tuple(dataclasses.replace(s, k_scale=k, v_scale=v) for s, (k, v) in zip(spec.layers, scales, strict=True))
    return dataclasses.replace(spec, layers=layers)


def load_kv_scales(model: CausalLM, reader: Any, scheme: dict[str, Any] | None) -> None:
    """Give ``model``'s layers the checkpoint's KV cache scales, where it has them (required where
    its quantization_config has a ``kv_cache_scheme``)."""
    check_kv_cache_scheme(scheme)
    scales = read_kv_scales(reader, model.kv_spec.num_layers, required=scheme is not None)
    if scales is None:
        return
    if not isinstance(model, LayeredCausalLM):
        raise NotImplementedError("the checkpoint has FP8 KV cache scales (self_attn.k_scale / v_scale), which load "
                                  "only into tandem's native families, not the transformers backend")
    model.kv_spec = with_kv_scales(model.kv_spec, scales)
    logger.info("KV cache scales from the checkpoint (used with kv_cache_dtype fp8): k %.3g..%.3g, v %.3g..%.3g",
                min(k for k, _ in scales), max(k for k, _ in scales), min(v for _, v in scales),
                max(v for _, v in scales))
