"""FP8 activation quantization in one kernel per linear input: the scale of each row, or of each
group of ``group`` columns of a row (block-wise weights), is its largest magnitude / 448 (clamped at
an upper bound where the checkpoint gives one), or the static per-tensor scale; the values are
divided by it and rounded to nearest even onto e4m3. The torch ops it replaces
(``quant.fp8.quantize_activations``) take five kernels per linear layer, and decode steps run four
such layers per decoder layer: in a CUDA graph their launches alone cost more than the work."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.fused import _round_to_fp8_grid


@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, n_cols, group, stride_x, scale_ub,
                      STATIC: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    start, stop = g * group, tl.minimum(g * group + group, n_cols)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for col in range(start, stop, BLOCK):
            offs = col + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < stop, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        top = tl.max(amax, axis=0)
        if HAS_UB:
            top = tl.minimum(top, scale_ub)
        # IEEE division, as torch's; the floor keeps an all-zero row's scale finite (quant.fp8)
        scale = tl.maximum(tl.math.div_rn(top, 448.0), 1.0 / (448.0 * 512.0))
    tl.store(scale_ptr + row * tl.num_programs(1) + g, scale)
    for col in range(start, stop, BLOCK):
        offs = col + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < stop, other=0.0).to(tl.float32)
        q = _round_to_fp8_grid(tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0), 3, -6)  # e4m3
        tl.store(q_ptr + row * n_cols + offs, q.to(q_ptr.dtype.element_ty), mask=offs < stop)


def fp8_quant(x: torch.Tensor, input_scale: torch.Tensor | None, scale_ub: float | None, group: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn x [M, K] row-major, float32 scales [M, groups]) of a 2-D ``x`` whose rows are
    contiguous; ``group`` None: one scale per row. ``input_scale`` (float32 [1]): the static scale,
    else from the values (clamped at ``scale_ub``)."""
    m, k = x.shape
    group = group or k
    groups = -(-k // group)
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, groups), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, scale
    static = input_scale if input_scale is not None else scale  # a pointer the kernel does not read
    _fp8_quant_kernel[(m, groups)](x, q, scale, static, k, group, x.stride(0), float(scale_ub or 0.0),
                                   STATIC=input_scale is not None, HAS_UB=scale_ub is not None,
                                   BLOCK=min(triton.next_power_of_2(group), 2048))
    return q, scale
