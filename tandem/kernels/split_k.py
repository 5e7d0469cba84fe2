"""The end of a split-K GEMM: the splits' float32 partial sums [S, M, N] added in split order, the
bias added, and the result rounded once to the output dtype, in one launch. (``sum(0)``, ``+ bias``
and ``.to()`` were three kernels per linear layer: at decode sizes, inside a CUDA graph, their
launches cost as much as the reduction's bytes.) The fixed order makes the result independent of
timing, which atomics would not."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["total", "n"])
def _split_sum_kernel(parts_ptr, bias_ptr, out_ptr, total, n, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(parts_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(parts_ptr + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def split_sum(parts: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``parts`` [S, M, N] -> [M, N] in ``out_dtype``: sum over S in order, plus ``bias`` [N]."""
    splits, m, n = parts.shape
    out = torch.empty((m, n), device=parts.device, dtype=out_dtype)
    total = m * n
    if total == 0:
        return out
    block = 1024
    _split_sum_kernel[(triton.cdiv(total, block),)](parts, bias if bias is not None else parts, out, total, n,
                                                    SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block)
    return out
