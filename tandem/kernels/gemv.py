"""One-row GEMV for 16-bit weights: y = x @ W^T with x [1, K] and W [N, K] as ``nn.Linear`` keeps it.

At batch 1 a decode step is a chain of weight reads; cuBLAS runs them as small-N GEMMs with a
separate split-K reduce (measured on the H100: the 8B model's projections at about 0.73 of their
bytes, benchmarks/RESULTS.md). Here each program streams a [BLOCK_N, BLOCK_K] tile of weight rows
(contiguous along K), multiplies it by the activations in float32 registers and keeps the products
element-wise; the one reduction along K happens after the loop. K is split over ``split_k``
programs whose partial sums the tile's last program adds in a fixed order (``split_k.finish_tile``:
the result does not depend on timing), with the bias. Triton pipelines only the loads that feed a
``tl.dot``, so the loop loads tile t + 1 before it computes tile t by hand.

Tiles come from the shape and the SM count alone (``gemv_tiles``): nothing is read back from the
device, so a decode step stays capturable in a CUDA graph."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels import num_sms
from tandem.kernels.pdl import pdl_launch, wait_then_release
from tandem.kernels.split_k import MAX_TILES, finish_tile, tile_counters


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int


def gemv_tiles(n: int, k: int, sms: int = 132) -> GemvTiles:
    """The H100 sweep's rule (benchmarks/RESULTS.md, ``quant_tune.py --kind=gemv``): fewer than ~6K
    rows take 8-row tiles with 8 warps (more programs per SM to hide the loads), more rows 16-row tiles
    with 4; K is split only while the row tiles do not fill one wave, since at two or more waves the
    split's extra pass cost more than it won (8B o and down, 1B qkv, o and down: 12-22% slower).
    ``block_k`` shrinks (a power of two, >= 64) to fit a short K."""
    few_rows = n < 6144
    block_n, num_warps = (8, 8) if few_rows else (16, 4)
    block_k = 1024 if few_rows and k <= 8192 else 512
    while block_k > 64 and block_k // 2 >= k:
        block_k //= 2
    n_tiles, k_tiles, split = triton.cdiv(n, block_n), triton.cdiv(k, block_k), 1
    while n_tiles * split < sms and k_tiles // (split * 2) >= 2:
        split *= 2
    return GemvTiles(block_n, block_k, split, num_warps)


@triton.jit
def _weights(w_ptr, rows, row_ok, kk, k, end):
    """The weights [BLOCK_N, BLOCK_K] of input channels ``kk`` (zero from ``end``, the split's end, on)."""
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * k + kk[None, :], mask=row_ok[:, None] & (kk < end)[None, :],
                   other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, parts_ptr, bias_ptr, counters_ptr, n, k, k_per_split, splits,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (j, 0, s): weight rows tile j, input channels [s * k_per_split, ...) (``finish_tile``
    adds the splits; it indexes tiles by the first two program axes)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # the weight's rows: output columns
    split = tl.program_id(2)
    row_ok = rows < n
    start = split * k_per_split
    end = tl.minimum(k, start + k_per_split)
    ks = tl.arange(0, BLOCK_K)
    w = _weights(w_ptr, rows, row_ok, start + ks, k, end)
    # the weights are the step's constants: the first tile is read before the wait; the activations,
    # which the kernel before this one writes, only after it
    wait_then_release(PDL)
    x = tl.load(x_ptr + start + ks, mask=start + ks < end, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        kk = k0 + BLOCK_K + ks
        w_next, x_next = _weights(w_ptr, rows, row_ok, kk, k, end), tl.load(x_ptr + kk, mask=kk < end, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w, x = w_next, x_next
    finish_tile(tl.sum(acc, axis=1), out_ptr, parts_ptr, bias_ptr, counters_ptr, rows, rows, row_ok, split, splits,
                n, HAS_BIAS)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tiles: GemvTiles | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ ``weight`` [N, K]^T (+ ``bias`` [N]) -> [1, N] in x's dtype, float32 accumulation,
    written to ``out`` if given (contiguous, N elements); ``tiles`` overrides ``gemv_tiles`` (tests, tuning)."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != k:
        raise ValueError(f"gemv: x {tuple(x.shape)} is not one row of the weight's {k} inputs")
    if not (weight.is_contiguous() and x.is_contiguous()):
        raise ValueError("gemv: x and the weight must be contiguous")
    tiles = tiles or gemv_tiles(n, k, num_sms(x.device))
    k_tiles = triton.cdiv(k, tiles.block_k)
    per_split = triton.cdiv(k_tiles, tiles.split_k) * tiles.block_k
    splits = triton.cdiv(k, per_split)
    if out is None:
        out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    elif out.numel() != n or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"gemv: out {tuple(out.shape)} {out.dtype} is not {n} contiguous {x.dtype} elements")
    parts = torch.empty((splits, n), device=x.device, dtype=torch.float32) if splits > 1 else out
    grid = (triton.cdiv(n, tiles.block_n), 1, splits)
    if grid[0] > MAX_TILES:
        raise ValueError(f"gemv: {grid[0]} output tiles, more than the {MAX_TILES} split-K counters")
    _gemv_kernel[grid](x, weight, out, parts, bias if bias is not None else out, tile_counters(x.device), n, k,
                       per_split, splits, HAS_BIAS=bias is not None, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                       num_warps=tiles.num_warps, num_stages=1, **pdl_launch(x.device))
    return out
