"""W4A16: y = x @ W^T with W stored as 4-bit integers (``tandem.kernels.int4_layout.Int4Weight``).

The weight never exists in 16 bits in memory: each program loads its tile of packed int32 words
(eight input channels per word; a column of words is one output channel, so a tile's loads are
contiguous along N), shifts out the nibbles, subtracts the group's zero point in float32 registers
(small exact integers), feeds them in the activations' dtype to ``tl.dot`` (float32 accumulation)
and scales the tile's product by the group's scales. A K tile lies inside one group (the tile
divides the group size), so each tile reads one row of scales and zero points. A few rows take a
multiply-and-sum in float32 registers instead of the dot (``W4Tiles.gemv``).

Decode (M <= 16) is bandwidth bound and has few output tiles: the K dimension is split over
``split_k`` programs whose float32 partial sums the tile's last program adds in a fixed order
(``split_k.finish_tile``: the result does not depend on timing). Larger M uses GEMM tiles with no split.
The tiles are chosen on the host from the shapes and the SM count alone (``w4a16_tiles``); nothing is read back from
the device, so a decode step stays capturable in a CUDA graph."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels import num_sms
from tandem.kernels.fused import silu_mul, silu_times
from tandem.kernels.paged_varlen import dot_precision
from tandem.kernels.pdl import pdl_launch, wait_then_release
from tandem.kernels.split_k import MAX_TILES, finish_tile, tile_counters
from tandem.kernels.int4_layout import MIN_GROUP, PACK, Int4Weight


@dataclass(frozen=True)
class W4Tiles:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    # How a tile's nibbles are unpacked: True loads each word once ([BK/8, BN]) and expands it by
    # broadcast + reshape; False loads it once per input channel it holds (eight times; the cache
    # answers the repeats). Which is faster is measured on the GPU (scripts/w4a16_bench.py).
    load_once: bool = True
    # Multiply-and-sum in float32 registers instead of ``tl.dot``, one row per program (``block_m``
    # unused): a
    # batch of one or a few rows wastes most of a tensor-core tile, and the dot's operand layout
    # costs a shuffle of every unpacked weight through shared memory.
    gemv: bool = False


def _block_k(group_size: int, largest: int) -> int:
    """The largest power-of-two tile (<= ``largest``) dividing the group: a tile never straddles two."""
    bk = largest
    while group_size % bk:
        bk //= 2
    return bk


def _splits(n_tiles: int, k_tiles: int, sms: int, least: int = 1) -> int:
    """K splits (a power of two, at most 8, at least ``least``) until the programs fill about eight
    waves of ``sms``, each split keeping >= 4 K tiles."""
    split = least
    while split < 8 and n_tiles * split * 2 <= 8 * sms and k_tiles // (split * 2) >= 4:
        split *= 2
    return split


def w4a16_tiles(m: int, n: int, k: int, group_size: int, sms: int = 132) -> W4Tiles:
    """The tile tier for M rows, from a sweep on an H100 at the 8B shapes in CUDA graphs
    (``scripts/quant_tune.py``, benchmarks/RESULTS.md): one row takes the multiply-and-sum kernel on
    narrow column tiles, up to 16 rows the dot with split K, more rows GEMM tiles with no split."""
    if m == 1:
        bk = _block_k(group_size, 128)
        return W4Tiles(1, 64, bk, _splits(triton.cdiv(n, 64), k // bk, sms), 4, 1, gemv=True)
    if m <= 16:
        bk = _block_k(group_size, 128)
        return W4Tiles(16, 128, bk, _splits(triton.cdiv(n, 128), k // bk, sms), 4, 3)
    if m <= 64:
        return W4Tiles(32 if m <= 32 else 64, 64, _block_k(group_size, 64), 1, 4, 3)
    big = m > 256
    return W4Tiles(128 if big else 64, 128, _block_k(group_size, 64), 1, 8 if big else 4, 3)


# 2**23 as a float32's bits, OR-ed with an integer below 2**23, is the float 2**23 + that integer:
# nibbles become floats by an OR and a subtraction (full-rate ALU) instead of an int-to-float
# conversion, which runs at a quarter of the rate.
MAGIC = tl.constexpr(0x4B000000)
MAGIC_VALUE = tl.constexpr(8388608.0)


@triton.jit
def _nibbles(q_ptr, k0, stride_qk, stride_qn, cols, col_ok, ks, shifts, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             LOAD_ONCE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] unsigned 4-bit values of input channels k0.., as float32 plus 2**23."""
    if LOAD_ONCE:
        words = tl.load(q_ptr + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[:, None] * stride_qk + cols[None, :] * stride_qn,
                        mask=col_ok[None, :], other=0)
        nibble = (tl.arange(0, 8) * 4)[None, :, None]
        q = tl.reshape((words[:, None, :] >> nibble) & 0xF, (BLOCK_K, BLOCK_N))  # row 8r + i: word r, nibble i
    else:
        words = tl.load(q_ptr + ((k0 + ks) // 8)[:, None] * stride_qk + cols[None, :] * stride_qn, mask=col_ok[None, :],
                        other=0)
        q = (words >> shifts) & 0xF
    return (q | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _group_params(s_ptr, z_ptr, g, n, cols, col_ok, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Group g's scales and its zero points plus 2**23 (what ``MAGIC`` floats carry), float32 [BLOCK_N]."""
    s = tl.load(s_ptr + g * n + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zoff = tl.load(z_ptr + g * n + cols, mask=col_ok, other=0).to(tl.float32) + MAGIC_VALUE
    else:
        zoff = tl.full((BLOCK_N,), 8.0 + MAGIC_VALUE, tl.float32)
    return s, zoff


# m (and the split stride m * n) change with the step: not specialised on, so a tier compiles once
@triton.jit(do_not_specialize=["m", "stride_ys"])
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, parts_ptr, counters_ptr, m, n, stride_xm, stride_qk, stride_qn,
                  stride_ys, k_tiles, tiles_per_split, splits, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, LOAD_ONCE: tl.constexpr,
                  PDL: tl.constexpr):
    """Program (i, j, s): rows tile i, columns tile j, K tiles [s * tiles_per_split, ...) of split s
    (``finish_tile`` adds the splits into y)."""
    wait_then_release(PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok, col_ok = rows < m, cols < n
    ks = tl.arange(0, BLOCK_K)
    shifts = ((ks % 8) * 4)[:, None]  # nibble i of a word is input channel 8r + i
    first = split * tiles_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, tl.minimum(first + tiles_per_split, k_tiles)):
        k0 = t * BLOCK_K
        s, zoff = _group_params(s_ptr, z_ptr, k0 // GROUP, n, cols, col_ok, HAS_ZEROS, BLOCK_N)
        a = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)
        q = _nibbles(q_ptr, k0, stride_qk, stride_qn, cols, col_ok, ks, shifts, BLOCK_N, BLOCK_K, LOAD_ONCE)
        part = tl.dot(a, (q - zoff[None, :]).to(a.dtype), input_precision=PRECISION)  # q - z: exact integers
        acc += part * s[None, :]
    finish_tile(acc, y_ptr, parts_ptr, y_ptr, counters_ptr, rows[:, None] * n + cols[None, :], cols[None, :] + 0 * rows[:, None],
                row_ok[:, None] & col_ok[None, :], split, splits, stride_ys, HAS_BIAS=False)


@triton.jit
def _row_loads(q_ptr, s_ptr, z_ptr, t, last, r, n, cols, col_ok, stride_qk, stride_qn, GROUP: tl.constexpr,
               HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """K tile t's packed words [BLOCK_K / 8, BLOCK_N], its group's scales and zero points (float32
    [BLOCK_N]); nothing from ``last`` on."""
    k0 = t * BLOCK_K
    ok = col_ok & (cols * 0 + t < last)
    words = tl.load(q_ptr + (k0 // 8 + r)[:, None] * stride_qk + cols[None, :] * stride_qn,
                    mask=ok[None, :], other=0)
    s, zoff = _group_params(s_ptr, z_ptr, k0 // GROUP, n, cols, ok, HAS_ZEROS, BLOCK_N)
    return words, s, zoff - MAGIC_VALUE


@triton.jit
def _nibble_fma(dot, a_sum, src, mask, a_ptrs, up_offset, pos: tl.constexpr, HAS_ZEROS: tl.constexpr,
                GATED: tl.constexpr):
    """``dot`` plus the activations at ``a_ptrs`` (one per word row) times the nibble at bit ``pos``
    (<= 16) of each word, as 2**23 + q * 2**pos minus 2**23 (see the kernel); ``a_sum`` plus them.
    Without zero points (symmetric: z = 8) the subtraction takes 8 * 2**pos off too. ``GATED``: the
    activation is silu(gate) * up, gate at ``a_ptrs`` and up ``up_offset`` elements further."""
    if GATED:
        a = silu_times(tl.load(a_ptrs), tl.load(a_ptrs + up_offset)).to(tl.float32)
    else:
        a = tl.load(a_ptrs).to(tl.float32)
    offset: tl.constexpr = MAGIC_VALUE if HAS_ZEROS else MAGIC_VALUE + 8.0 * (1 << pos)
    w = ((src & mask) | MAGIC).to(tl.float32, bitcast=True) - offset
    return dot + (a * (1.0 / (1 << pos)))[:, None] * w, a_sum + a


@triton.jit(do_not_specialize=["m", "stride_ys", "nibble"])
def _w4a16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, parts_ptr, counters_ptr, m, n, stride_xm, stride_qk,
                       stride_qn, stride_ys, k_tiles, tiles_per_split, splits, nibble, up_offset, GROUP: tl.constexpr,
                       HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr, GATED: tl.constexpr):
    """``_w4a16_kernel``'s programs without the dot, one row each (program axis 0; ``BLOCK_M`` unused).

    Issue slots, not bandwidth, bound a one-row 4-bit GEMV (Nsight Compute: an earlier version issued
    16 instructions per weight, 82% of the slots busy, DRAM 28%), so each weight costs three: the
    nibble masked in place and OR-ed into 2**23's bits (one LOP3) is the float 2**23 + q * 2**p,
    subtracting 2**23 leaves q * 2**p exactly, and one FMA adds it times the activation pre-scaled by
    2**-p. Everything else is paid per activation or per tile, shared by the columns a thread holds:
    the zero point enters once per tile as z * sum(activations) (sum_k a_k (q_k - z) = sum_k a_k q_k
    - z sum_k a_k), the scale once per tile, the sum over the tile's word rows once at the end.
    ``nibble`` is 0xF, passed at run time: as a constant, the compiler rebuilt each shifted mask with
    a move before every LOP3 (whose one immediate holds 2**23), an extra instruction per weight."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    col_ok = cols < n
    r = tl.arange(0, BLOCK_K // 8)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    # tile t + 1's loads are issued before tile t is computed: Triton pipelines only loads that feed
    # a dot, so without this each tile would wait out a full memory latency
    words, s, z = _row_loads(q_ptr, s_ptr, z_ptr, first, last, r, n, cols, col_ok, stride_qk, stride_qn, GROUP,
                             HAS_ZEROS, BLOCK_N, BLOCK_K)
    wait_then_release(PDL)  # the weights are the step's constants: the first tile's loads start before it
    for t in range(first, last):
        k0 = t * BLOCK_K
        words_next, s_next, z_next = _row_loads(q_ptr, s_ptr, z_ptr, t + 1, last, r, n, cols, col_ok, stride_qk,
                                                stride_qn, GROUP, HAS_ZEROS, BLOCK_N, BLOCK_K)
        high = words >> 12  # nibbles 5-7 moved below bit 23
        dot = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        a_sum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        for i in tl.static_range(5):  # nibbles 0-4 in place
            dot, a_sum = _nibble_fma(dot, a_sum, words, nibble << (4 * i), x_row + k0 + 8 * r + i, up_offset, 4 * i,
                                     HAS_ZEROS, GATED)
        for i in tl.static_range(5, 8):
            dot, a_sum = _nibble_fma(dot, a_sum, high, nibble << (4 * i - 12), x_row + k0 + 8 * r + i, up_offset,
                                     4 * i - 12, HAS_ZEROS, GATED)
        if HAS_ZEROS:
            acc += (dot - a_sum[:, None] * z[None, :]) * s[None, :]
        else:
            acc += dot * s[None, :]
        words, s, z = words_next, s_next, z_next
    finish_tile(tl.sum(acc, axis=0), y_ptr, parts_ptr, y_ptr, counters_ptr, row * n + cols, cols, col_ok, split, splits,
                stride_ys, HAS_BIAS=False)


def _check(x: torch.Tensor, w: Int4Weight, gated: bool) -> None:
    k, n = w.in_features, w.out_features
    if x.shape[-1] != (2 * k if gated else k):
        raise ValueError(f"w4a16: x has {x.shape[-1]} input features, the weight {k}{' (x2: gated)' if gated else ''}")
    if w.group_size % MIN_GROUP or k % w.group_size or n % PACK:
        raise ValueError(f"w4a16: group_size {w.group_size} (K {k}, N {n}) is not implemented: "
                         f"a multiple of {MIN_GROUP} dividing K, N a multiple of {PACK}")
    if w.scales.shape != (k // w.group_size, n) or w.scales.dtype != x.dtype:
        raise ValueError(f"w4a16: scales {tuple(w.scales.shape)} {w.scales.dtype} do not match "
                         f"({k // w.group_size}, {n}) {x.dtype}")
    if w.zeros is not None and (w.zeros.shape != w.scales.shape or w.zeros.dtype != torch.uint8):
        raise ValueError(f"w4a16: zeros {tuple(w.zeros.shape)} {w.zeros.dtype}, expected uint8 like the scales")
    if not all(t.is_contiguous() for t in (w.scales, w.zeros) if t is not None) or 1 not in w.qweight.stride():
        raise ValueError("w4a16: the scales and zeros must be contiguous (the kernel indexes rows by N), and the "
                         "packed weights dense along N or along K")


def w4a16_matmul(x: torch.Tensor, w: Int4Weight, tiles: W4Tiles | None = None, gated: bool = False) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype; ``tiles`` overrides the tile table (tests, tuning). ``gated``:
    x is [..., 2K] = [gate | up] and the GEMM's input is silu(gate) * up, which the one-row kernel
    computes as it loads its activations (one kernel less per MLP at batch 1); other tiers, and act
    order, compute it first (``fused.silu_mul``)."""
    lead, k, n = x.shape[:-1], w.in_features, w.out_features
    _check(x, w, gated)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    tiles = tiles or w4a16_tiles(x2.shape[0], n, k, w.group_size, num_sms(x.device))
    if gated and not (tiles.gemv and w.perm is None):
        x2, gated = silu_mul(x2.contiguous()), False
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)  # act order: channels sorted by group, as the weight's rows are
    x2 = x2.contiguous()
    m = x2.shape[0]
    k_tiles = k // tiles.block_k
    per_split = triton.cdiv(k_tiles, tiles.split_k)
    splits = triton.cdiv(k_tiles, per_split)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = (m if tiles.gemv else triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n), splits)
    if grid[0] * grid[1] > MAX_TILES:
        raise ValueError(f"w4a16: {grid[0] * grid[1]} output tiles, more than the {MAX_TILES} split-K counters")
    args = (x2, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, y, parts,
            tile_counters(x.device), m, n, x2.stride(0), w.qweight.stride(0), w.qweight.stride(1), m * n, k_tiles,
            per_split, splits)
    common = dict(GROUP=w.group_size, HAS_ZEROS=w.zeros is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                  BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_launch(x.device))
    if tiles.gemv:
        _w4a16_gemv_kernel[grid](*args, 0xF, k, GATED=gated, **common)
    else:
        _w4a16_kernel[grid](*args, PRECISION=dot_precision(x.dtype), LOAD_ONCE=tiles.load_once, **common)
    return y.reshape(*lead, n)
