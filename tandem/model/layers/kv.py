"""Writing a step's keys and values into one layer's paged cache."""
from __future__ import annotations

import torch


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's K and V ([T, Hkv, D]) into one layer's cache [2, slots, Hkv, D]."""
    cache[0].index_copy_(0, slot_mapping, k)
    cache[1].index_copy_(0, slot_mapping, v)
