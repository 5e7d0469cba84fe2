"""The one layout of 4-bit weights the W4A16 kernel reads (``tandem/model/quant/int4.py`` fills it from
each checkpoint format and documents it): ``qweight`` [K / 8, N] int32, eight input channels per
word; per-group ``scales`` and ``zeros`` [K / G, N]; an optional act-order ``perm`` [K]."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PACK = 8  # 4-bit values per int32
MIN_GROUP = 32  # the kernel reads whole K tiles of one group; its smallest tile is 32 channels


@dataclass
class Int4Weight:
    """The kernel's layout of one 4-bit linear (see the module docstring)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def to(self, device: torch.device | str, scale_dtype: torch.dtype) -> Int4Weight:
        """On ``device``, the scales in the model's dtype (the kernel dequantizes into it)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Int4Weight(self.qweight.to(device), self.scales.to(device, scale_dtype), move(self.zeros),
                          self.group_size, move(self.perm))
