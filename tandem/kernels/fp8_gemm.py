"""The block-wise FP8 GEMM (weights with one scale per [bn, bk] block, the Qwen3/DeepSeek "-FP8"
format): out = sum over k-blocks of (a_fp8 @ b_fp8^T) * a_scale[row, kb] * b_scale[nb, kb], the
activations quantized per row and group of bk columns (``kernels/fp8_quant``). Each BLOCK_K step lies
inside one scale block, so the FP8 product of a step is scaled once, in float32. ``FP8_DOT`` False
(Triton's interpreter, which has no FP8 matrix product) multiplies the same values widened to
float32."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tandem.kernels import num_sms
from tandem.kernels.split_k import MAX_TILES, finish_tile, tile_counters


@triton.jit
def _fp8_block_gemm_kernel(a_ptr, b_ptr, c_ptr, parts_ptr, counters_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, m, n, k,
                           stride_am, stride_bn, a_groups, b_kblocks, block_n, block_k, k_per_split, splits,
                           HAS_BIAS: tl.constexpr, FP8_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    split = tl.program_id(2)
    for k0 in range(split * k_per_split, tl.minimum(k, split * k_per_split + k_per_split), BLOCK_K):
        kk = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :], mask=(rows[:, None] < m) & (kk[None, :] < k),
                    other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + kk[:, None], mask=(cols[None, :] < n) & (kk[:, None] < k),
                    other=0.0)  # [BLOCK_K, BLOCK_N]: the weight is [n, k] row-major
        if FP8_DOT:
            part = tl.dot(a, b)
        else:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        kb = k0 // block_k
        sa = tl.load(a_scale_ptr + rows * a_groups + kb, mask=rows < m, other=0.0)
        sb = tl.load(b_scale_ptr + (cols // block_n) * b_kblocks + kb, mask=cols < n, other=0.0)
        acc += part * sa[:, None] * sb[None, :]
    finish_tile(acc, c_ptr, parts_ptr, bias_ptr, counters_ptr, rows[:, None] * n + cols[None, :],
                cols[None, :] + 0 * rows[:, None], (rows[:, None] < m) & (cols[None, :] < n), split, splits, m * n,
                HAS_BIAS)


def block_step(width: int) -> int:
    """BLOCK_K for scale blocks ``width`` wide: the largest power of two up to 128 dividing it (a
    step never straddles two scale blocks)."""
    return math.gcd(width, 128)


def _num_splits(programs: int, steps: int, device: torch.device) -> int:
    """Decode sizes leave too few tiles to keep every SM reading weights: split K over two programs
    per SM, each keeping at least 4 steps."""
    return max(1, min(2 * num_sms(device) // programs, steps // 4))


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   block: tuple[int, int], out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """a [M, K] FP8 with a_scale [M, ceil(K / bk)]; b [N, K] FP8 with b_scale [ceil(N / bn), ceil(K / bk)]
    -> [M, N] in ``out_dtype``. Tiles from the shapes only (static shapes: graph-capturable). Row-wise
    weight scales are the block [1, K] (b_scale [N, 1]), per-token activation scales a_scale [M, 1].
    ``split_k`` (default: from the shapes, for up to 64 rows): K split over that many programs per tile,
    whose float32 partial sums the tile's last program adds in a fixed order (``split_k.finish_tile``:
    the same result every run)."""
    m, k = a.shape
    n = b.shape[0]
    block_k = block_step(block[1])
    if block_k < 16:
        raise ValueError(f"the FP8 block GEMM needs a block width divisible by 16, got {block[1]}")
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = 32 if m <= 64 else 128  # decode batches: more column tiles, to keep every SM reading weights
    if m == 0:
        return torch.empty((m, n), device=a.device, dtype=out_dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    steps = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = _num_splits(grid[0] * grid[1], steps, a.device) if m <= 64 else 1
    per_split = triton.cdiv(steps, split_k) * block_k
    splits = triton.cdiv(k, per_split)
    c = torch.empty((m, n), device=a.device, dtype=out_dtype)
    parts = torch.empty((splits, m, n), device=a.device, dtype=torch.float32) if splits > 1 else c
    if grid[0] * grid[1] > MAX_TILES:
        raise ValueError(f"fp8_block_gemm: {grid[0] * grid[1]} output tiles, more than the {MAX_TILES} counters")
    _fp8_block_gemm_kernel[grid + (splits,)](
        a, b, c, parts, tile_counters(a.device), a_scale, b_scale, bias if bias is not None else c, m, n, k,
        a.stride(0), b.stride(0), a_scale.shape[1], b_scale.shape[1], block[0], block[1], per_split, splits,
        HAS_BIAS=bias is not None, FP8_DOT=a.is_cuda, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c
