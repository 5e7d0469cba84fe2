"""FP8 activation quantization in one kernel per step's linear input: each row's scale (its largest
magnitude / 448, clamped at an upper bound where the checkpoint gives one, or a static per-tensor
scale) and the row divided by it, rounded to nearest even onto e4m3. The torch ops it replaces
(``quant.fp8.quantize_activations``) take five kernels per linear layer, and decode steps run
four such layers per decoder layer: in a CUDA graph their launches alone cost more than the work."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.fused import _round_to_e4m3_grid

@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, n_cols, stride_x, scale_ub,
                          STATIC: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        top = tl.max(amax, axis=0)
        if HAS_UB:
            top = tl.minimum(top, scale_ub)
        scale = tl.maximum(tl.math.div_rn(top, 448.0), 1.0 / (448.0 * 512.0))  # as quant.fp8: a zero row's stays finite
    tl.store(scale_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
        q = _round_to_e4m3_grid(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0))  # IEEE, as torch divides
        tl.store(q_ptr + row * n_cols + offs, q.to(q_ptr.dtype.element_ty), mask=offs < n_cols)


def per_token_fp8(x: torch.Tensor, input_scale: torch.Tensor | None, scale_ub: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn x [M, K] row-major, float32 scales [M, 1]) of a 2-D ``x`` whose rows are
    contiguous; ``input_scale`` (float32 [1]): the static scale, else per row (clamped at ``scale_ub``)."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    static = input_scale if input_scale is not None else scale  # a pointer the kernel does not read
    _per_token_fp8_kernel[(m,)](x, q, scale, static, k, x.stride(0), float(scale_ub or 0.0),
                                STATIC=input_scale is not None, HAS_UB=scale_ub is not None,
                                BLOCK=min(triton.next_power_of_2(k), 2048))
    return q, scale
