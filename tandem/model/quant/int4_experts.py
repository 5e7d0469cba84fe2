"""4-bit weights of a mixture-of-experts layer, kept packed on the device (W4A16 experts).

The layout is the dense W4A16 GEMM's (``kernels/int4_layout.Int4Weight``, documented in
``quant/int4``) with an expert dimension in front, for w13 [E, 2I, H] or w2 [E, H, I] ([E, N, K]):

- ``qweight`` [E, K / 8, N] int32: nibble i of word [e, r, n] is the unsigned q in [0, 15] of input
  channel 8r + i, output channel n (a tile of output channels reads contiguous words);
- ``scales`` [E, K / G, N] in the model dtype and ``zeros`` [E, K / G, N] uint8 per group of G input
  channels (``zeros`` None: symmetric, every zero point 8, no bytes stored).

The value of an element is ``(q - zero) * scale`` in float32, rounded once to the model dtype: what
``int4.dequantize`` stores when 4-bit weights are dequantized at load, what the fused kernel
(``kernels/fused_moe``) computes tile by tile in registers and the reference
(``layers/experts.experts_reference``) expert by expert, so all three multiply the same weights.

Act-order (GPTQ ``desc_act``) experts, whose groups are scattered over the input channels, are not
kept 4-bit: the loader dequantizes them (``int4_linear.Int4Getter.expert`` says so in the log)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.model.quant import int4
from tandem.model.quant.int4 import Int4Weight

# The fused kernel's K tile (a power of two, at least tl.dot's 16) must divide the group
KERNEL_GROUP = 16


@dataclass
class Int4Experts:
    """w13 [E, 2I, H] or w2 [E, H, I] of one MoE layer as packed 4-bit weights (see the module docstring)."""

    qweight: torch.Tensor  # int32 [E, K / 8, N]
    scales: torch.Tensor  # model dtype [E, K / G, N]
    zeros: torch.Tensor | None  # uint8 [E, K / G, N]; None: symmetric (8)
    group_size: int  # G: input channels per scale

    def __post_init__(self) -> None:
        e, words, n = self.qweight.shape
        k, g = words * int4.PACK, self.group_size
        want = (e, k // g, n) if g > 0 and k % g == 0 else None
        zeros = None if self.zeros is None else list(self.zeros.shape)
        if (self.qweight.dtype != torch.int32 or want is None or tuple(self.scales.shape) != want
                or g % KERNEL_GROUP or (zeros is not None and zeros != list(want))):
            raise ValueError(f"4-bit experts: qweight {self.qweight.dtype} {list(self.qweight.shape)}, scales "
                             f"{list(self.scales.shape)}, zeros {zeros} in groups of {g} (want int32 [E, K / 8, N] "
                             f"and [E, K / G, N], G a multiple of {KERNEL_GROUP} dividing K)")

    @property
    def shape(self) -> torch.Size:
        """[E, N, K], the dense experts' shape."""
        e, words, n = self.qweight.shape
        return torch.Size((e, n, words * int4.PACK))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: the packed words, the scales and the zero points (none when symmetric)."""
        tensors = [t for t in (self.qweight, self.scales, self.zeros) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def weight(self, e: int) -> Int4Weight:
        """Expert ``e`` as the dense layers' ``Int4Weight`` (views, no copy)."""
        return Int4Weight(self.qweight[e], self.scales[e], None if self.zeros is None else self.zeros[e],
                          self.group_size)

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s weight [N, K] dequantized as loading does (``int4.dequantize``), in ``dtype``."""
        return int4.dequantize(self.weight(e)).to(dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([self.expert(e, dtype) for e in range(self.shape[0])])

    @staticmethod
    def of(weight: Int4Weight) -> Int4Experts:
        """One expert's projection (a linear layer's ``Int4Weight`` [N, K]) as a one-expert stack."""
        if weight.perm is not None:
            raise ValueError("4-bit experts: act-order weights (a permutation of the input channels) are not "
                             "kept 4-bit")
        zeros = None if weight.zeros is None else weight.zeros[None]
        return Int4Experts(weight.qweight[None], weight.scales[None], zeros, weight.group_size)

    @staticmethod
    def quantize(dense: torch.Tensor, group_size: int = 128) -> Int4Experts:
        """Dense experts [E, N, K] to round-to-nearest symmetric 4 bits in groups of ``group_size``
        (-1: one group per output channel), as the linear layers under ``--quantization int4``."""
        return Int4Experts.stack([Int4Experts.of(int4.quantize_rtn(w, group_size)) for w in dense])

    @staticmethod
    def cat_rows(parts: list[Int4Experts], what: str) -> Int4Experts:
        """The parts' output rows one after another (gate then up, or a rank's two slices): any row
        counts join, since scales are per row; the groups and input widths must agree. ``what``
        names the weight in that error."""
        first = parts[0]
        if any(p.group_size != first.group_size or p.shape[::2] != first.shape[::2] for p in parts):
            raise ValueError(f"{what}: 4-bit expert weights {[list(p.shape) for p in parts]} in groups of "
                             f"{[p.group_size for p in parts]} cannot be joined along their rows")
        return _joined(parts, 2)

    @staticmethod
    def stack(parts: list[Int4Experts]) -> Int4Experts:
        """Experts one after another (one-expert stacks of equal shapes and groups)."""
        if any(p.group_size != parts[0].group_size or p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError("4-bit experts of different shapes or group sizes cannot be stacked")
        return _joined(parts, 0)


def _joined(parts: list[Int4Experts], dim: int) -> Int4Experts:
    """``parts`` concatenated along ``dim`` of their tensors; zero points stored for all where any
    part stores them (a part found symmetric at load holds none: its 8s are written out)."""
    zeros = None
    if any(p.zeros is not None for p in parts):
        zeros = torch.cat([torch.full_like(p.scales, 8, dtype=torch.uint8) if p.zeros is None else p.zeros
                           for p in parts], dim)
    return Int4Experts(torch.cat([p.qweight for p in parts], dim), torch.cat([p.scales for p in parts], dim),
                       zeros, parts[0].group_size)
