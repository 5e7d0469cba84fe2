"""The fp8 element types a KV cache may hold (``kv_cache_dtype`` fp8 / fp8_e4m3, fp8_e5m2), and what
storing into one needs to know of each. Torch only: the torch reference (``model.layers.kv``) and
the fused kernel read the same table."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp8Format:
    """An fp8 cache element type: its largest finite value (larger ones saturate to it: a cast alone
    gives NaN or infinity), mantissa bits and least normal exponent (the fused kernel rounds by them)."""

    max: float
    mantissa: int
    min_exp: int


FP8_FORMATS = {torch.float8_e4m3fn: Fp8Format(448.0, 3, -6), torch.float8_e5m2: Fp8Format(57344.0, 2, -14)}
