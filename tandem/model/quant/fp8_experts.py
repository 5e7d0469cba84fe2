"""FP8 (float8_e4m3fn) weights of a mixture-of-experts layer, kept FP8 on the device.

One representation covers the three scale forms the checkpoints store: ``weight`` [E, N, K] in FP8
and a float32 scale grid [E, ceil(N/bn), ceil(K/bk)] with ``block`` = (bn, bk) rows and columns per
scale. Per-output-channel scales are bn = 1, bk = K; per-tensor scales (one per expert and
projection) are expanded to their rows, as ``Fp8Weight`` does, so that gate and up, scaled apart,
fuse into one w13; block-wise weights keep their [bn, bk] blocks (e.g. [128, 128]).

The value of an element is ``(fp8 -> float32) * scale``, rounded once to the model dtype: the fused
kernel (``kernels/fused_moe``) computes exactly that in registers and the reference
(``layers/experts.experts_reference``) per expert as it reads it, so either equals the model whose
experts were dequantized at load (``dequantize``), bit for bit in the weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.model.quant.fp8 import FP8, Fp8Weight, expand_blocks, quantize_per_channel


@dataclass
class Fp8Experts:
    """w13 [E, 2I, H] or w2 [E, H, I] of one MoE layer in FP8, with its scale grid."""

    weight: torch.Tensor  # float8_e4m3fn [E, N, K]
    scale: torch.Tensor  # float32 [E, ceil(N / bn), ceil(K / bk)]
    block: tuple[int, int]  # (bn, bk): the weight rows and columns each scale covers

    def __post_init__(self) -> None:
        e, n, k = self.weight.shape
        grid = (e, -(-n // self.block[0]), -(-k // self.block[1]))
        if self.weight.dtype != FP8 or tuple(self.scale.shape) != grid:
            raise ValueError(f"FP8 experts: weight {self.weight.dtype} {list(self.weight.shape)} with scales "
                             f"{list(self.scale.shape)} in {list(self.block)} blocks (want float8_e4m3fn and {grid})")

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        """Bytes stored: the FP8 weight and its float32 scales."""
        return self.weight.numel() + self.scale.numel() * self.scale.element_size()

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s weight [N, K] dequantized to ``dtype`` (the reference reads it so)."""
        return _dequantize(self.weight[e], self.scale[e], self.block, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([self.expert(e, dtype) for e in range(self.shape[0])])

    @staticmethod
    def of(weight: Fp8Weight) -> Fp8Experts:
        """One expert's projection (a linear layer's FP8 weight [N, K]) as a one-expert stack. Its
        static activation scale, if any, is not kept: experts multiply 16-bit activations."""
        n, k = weight.shape
        if weight.block is None:  # a scale per row (per-tensor scales are already expanded to rows)
            # an empty part (columns of an expert another rank holds) has an empty grid
            grid = weight.scale.reshape(1, n, 1)[:, :, :min(k, 1)].float()
            return Fp8Experts(weight.weight[None], grid, (1, max(k, 1)))
        return Fp8Experts(weight.weight[None], weight.scale[None].float(), weight.block)

    @staticmethod
    def quantize(dense: torch.Tensor) -> Fp8Experts:
        """Dense experts [E, N, K] to FP8 per output channel (``--quantization fp8`` at load)."""
        return Fp8Experts.stack([Fp8Experts.of(quantize_per_channel(w)) for w in dense])

    @staticmethod
    def cat_rows(parts: list[Fp8Experts], what: str) -> Fp8Experts:
        """The parts' output rows one after another (gate then up, or a rank's two slices): every
        part but the last must end on a scale block, else the rows after it would read the wrong
        scales. ``what`` names the weight in that error."""
        first = parts[0]
        ragged = [p.shape[1] for p in parts[:-1] if p.shape[1] % first.block[0]]
        if any(p.block != first.block or p.shape[2] != first.shape[2] for p in parts) or ragged:
            raise ValueError(f"{what}: FP8 expert weights {[list(p.shape) for p in parts]} in "
                             f"{[list(p.block) for p in parts]} blocks cannot be joined along their rows "
                             f"(each but the last must hold whole {first.block[0]}-row blocks)")
        return Fp8Experts(torch.cat([p.weight for p in parts], 1), torch.cat([p.scale for p in parts], 1), first.block)

    @staticmethod
    def stack(parts: list[Fp8Experts]) -> Fp8Experts:
        """Experts one after another (one-expert stacks of equal shapes and blocks)."""
        if any(p.block != parts[0].block or p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError("FP8 experts of different shapes or scale blocks cannot be stacked")
        return Fp8Experts(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), parts[0].block)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] times its grid's scales, per element in float32, rounded once to ``dtype``."""
    return (q.float() * expand_blocks(scale, block, tuple(q.shape))).to(dtype)
