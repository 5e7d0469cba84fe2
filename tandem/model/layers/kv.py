"""Writing a step's keys and values into one layer's paged cache."""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # the largest finite float8_e4m3fn; larger values saturate to it (casting alone gives NaN)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of ``dtype`` holds it: unchanged for the model dtype; for float8_e4m3fn,
    x / scale in float32, saturated to +-448, rounded to nearest even (what the fused kernel stores)."""
    if dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def from_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache values back in ``dtype``: an fp8 value times its scale, in float32 then rounded once."""
    if x.dtype != torch.float8_e4m3fn:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write this step's K and V ([T, Hkv, D]) into one layer's cache [2, slots, Hkv, D]; an fp8
    cache gets K / k_scale and V / v_scale (the layer's ``AttentionSpec`` scales)."""
    k, v = to_cache_dtype(k, cache.dtype, k_scale), to_cache_dtype(v, cache.dtype, v_scale)
    if cache.dtype == torch.float8_e4m3fn:  # torch copies fp8 by index only as bytes
        cache, k, v = cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    cache[0].index_copy_(0, slot_mapping, k)
    cache[1].index_copy_(0, slot_mapping, v)
