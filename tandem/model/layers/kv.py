"""Writing a step's keys and values into one layer's paged cache."""
from __future__ import annotations

import torch

from tandem.kernels.fp8_formats import FP8_FORMATS

def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_FORMATS


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of ``dtype`` holds it: unchanged for the model dtype; for an fp8 type (e4m3 or
    e5m2), x / scale in float32, saturated to its largest finite value, rounded to nearest even (what
    the fused kernel stores)."""
    if not is_fp8(dtype):
        return x.to(dtype)
    top = FP8_FORMATS[dtype].max
    return (x.float() / scale).clamp(-top, top).to(dtype)


def from_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache values back in ``dtype``: an fp8 value times its scale, in float32 then rounded once."""
    if not is_fp8(x.dtype):
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write this step's K and V ([T, Hkv, D]) into one layer's cache [2, slots, Hkv, D]; an fp8
    cache gets K / k_scale and V / v_scale (the layer's ``AttentionSpec`` scales)."""
    k, v = to_cache_dtype(k, cache.dtype, k_scale), to_cache_dtype(v, cache.dtype, v_scale)
    if is_fp8(cache.dtype):  # torch copies fp8 by index only as bytes
        cache, k, v = cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    cache[0].index_copy_(0, slot_mapping, k)
    cache[1].index_copy_(0, slot_mapping, v)
