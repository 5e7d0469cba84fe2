"""FP8 (float8_e4m3fn) linear weights: storage, dequantization, quantization at load, and the forward.

A weight is ``q * scale``: one float32 scale per output row (per-tensor scales are expanded to their
rows, so that q, k and v, or gate and up, fuse into one matrix however they were scaled) or one per
[bn, bk] block. At decode sizes the forward multiplies 16-bit activations by the widened FP8 weights
(``kernels/w8a16``); larger batches quantize the activations to FP8 too (per token, dynamically, or
with the checkpoint's static per-tensor scale) and multiply in FP8 with ``torch._scaled_mm``, which
needs compute capability >= 8.9 (Ada, Hopper); ``reference_linear`` is that arithmetic in float32."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps an all-zero row's scale finite


def native_fp8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` runs FP8 here with row-wise scales (bfloat16 out)."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 9))


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """A [ceil(N/bn), ceil(K/bk)] block scale as one scale per element of the [N, K] weight."""
    return scale.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


@dataclass
class Fp8Weight:
    """A linear layer's FP8 weight [N, K] with its scales; ``input_scale`` (float32 [1]) is the static
    activation scale, None for dynamic per-token scales (clamped at ``scale_ub`` when set)."""

    weight: torch.Tensor
    scale: torch.Tensor  # float32 [N], or [ceil(N/bn), ceil(K/bk)] when block is set
    block: tuple[int, int] | None = None
    input_scale: torch.Tensor | None = None
    scale_ub: float | None = None

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        """Bytes stored (the weight, its scales and the static activation scale)."""
        tensors = [self.weight, self.scale] + ([self.input_scale] if self.input_scale is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.block is None:
            return (self.weight.float() * self.scale[:, None]).to(dtype)
        return (self.weight.float() * expand_blocks(self.scale, self.block, tuple(self.shape))).to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_linear(x, self, bias)

    @staticmethod
    def cat_rows(parts: list[Fp8Weight]) -> Fp8Weight:
        """One weight of the parts' rows (q, k, v; gate, up). A static activation scale becomes the
        largest of the parts' (the same input goes through each, so none of them clips)."""
        first = parts[0]
        if any(p.block != first.block or (p.input_scale is None) != (first.input_scale is None) for p in parts):
            raise ValueError("cannot fuse FP8 weights stored with different schemes (block size or activation scales)")
        if first.block is not None:
            ragged = [tuple(p.shape) for p in parts[:-1] if p.shape[0] % first.block[0]]
            if ragged:
                raise ValueError(f"block-wise FP8 weights of shapes {ragged} do not end on a {first.block} block "
                                 "boundary: they cannot be fused")
        statics = [p.input_scale for p in parts if p.input_scale is not None]
        return Fp8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), first.block,
                         torch.stack(statics).amax(0) if statics else None, first.scale_ub)


def quantize_per_channel(w: torch.Tensor) -> Fp8Weight:
    """The FP8 weight nearest ``w`` [N, K] with one scale per row (quantization at load)."""
    scale = (w.abs().amax(dim=1).float() / FP8_MAX).clamp(min=_MIN_SCALE)
    return Fp8Weight((w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None, scale_ub: float | None,
                         group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 x [M, K], float32 scales [M, groups]): per token (``group`` None) or per group of
    ``group`` columns from the largest magnitude, or the static scale. Device work only (no host
    synchronisation): capturable in a CUDA graph. On CUDA one Triton kernel (``kernels/fp8_quant``)
    does what the torch ops below do."""
    if x.is_cuda and x.stride(-1) == 1:
        from tandem.kernels.fp8_quant import fp8_quant

        return fp8_quant(x, input_scale, scale_ub, group)
    if input_scale is not None:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    m, k = x.shape
    size = group or k
    groups = -(-k // size)
    padded = F.pad(x.float(), (0, groups * size - k))
    amax = padded.view(m, groups, size).abs().amax(dim=-1)
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    return (x.float() / scale.repeat_interleave(size, 1)[:, :k]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w.T with FP8 weights. On CUDA at decode sizes (``w8a16.MAX_ROWS`` rows) the
    activations stay in 16 bits and the weight-only GEMM widens the FP8 weights in registers: the
    step is bound by reading weights, and quantizing the activations would cost a launch per layer
    for nothing. Larger batches quantize the activations (per token, or per group of a block's
    width) and multiply in FP8: ``torch._scaled_mm`` for row-wise weights, the Triton block GEMM
    (``kernels/fp8_gemm``) for block-wise ones. The CPU reaches here only in tests (weights are
    dequantized at load there), through the same two."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    width = k if w.block is None else w.block[1]
    if x.is_cuda and x2.shape[0] <= _w8a16_rows() and math.gcd(width, 128) >= 16:  # 16: a dot's least depth
        from tandem.kernels.w8a16 import w8a16_matmul

        return w8a16_matmul(x2.contiguous(), w.weight, w.scale, w.block, bias).view(*lead, w.shape[0])
    if w.block is not None:
        from tandem.kernels.fp8_gemm import fp8_block_gemm

        xq, scale_a = quantize_activations(x2, None, None, w.block[1])
        return fp8_block_gemm(xq, scale_a, w.weight, w.scale, w.block, x.dtype, bias).view(*lead, w.shape[0])
    xq, scale_a = quantize_activations(x2, w.input_scale, w.scale_ub)
    out = torch._scaled_mm(xq, w.weight.t(), scale_a=scale_a, scale_b=w.scale.view(1, -1), out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*lead, w.shape[0])


def _w8a16_rows() -> int:
    from tandem.kernels.w8a16 import MAX_ROWS

    return MAX_ROWS


def reference_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_linear``'s arithmetic in float32 on any device: the FP8 activations times the FP8 weights."""
    lead, k = x.shape[:-1], x.shape[-1]
    group = None if w.block is None else w.block[1]
    xq, scale_a = quantize_activations(x.reshape(-1, k), w.input_scale, w.scale_ub, group)
    out = (xq.float() * scale_a.repeat_interleave(group or k, 1)[:, :k]) @ w.dequantize(torch.float32).t()
    if bias is not None:
        out = out + bias.float()
    return out.view(*lead, w.shape[0]).to(x.dtype)
