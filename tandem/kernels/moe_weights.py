"""How the fused MoE kernel (``fused_moe``) reads its experts' weights: dense, FP8 or 4-bit tiles.

Each K step of the grouped GEMM loads a [BLOCK_K, BLOCK_N] tile of B (one expert's weight, K input
channels by N output channels) in the model dtype ``dt``, whatever it is stored as:

- dense (``DENSE``): as stored, [E, N, K];
- FP8 (``FP8``): float8_e4m3fn [E, N, K] with a float32 scale grid [E, ceil(N / bn), ceil(K / bk)];
  each element widened to float32 times its scale, rounded once to ``dt``;
- 4-bit (``INT4``): the W4A16 layout with an expert dimension in front, packed words [E, K / 8, N]
  (eight input channels per int32), scales [E, K / G, N] and uint8 zero points (or the constant 8);
  the tile's BLOCK_K / 8 rows of words are loaded once and their nibbles shifted out, then each
  element is (q - zero) * scale in float32, rounded once to ``dt``. The K tile lies inside one group
  (the host picks BLOCK_K dividing G), so it reads one row of scales and zero points.

Either quantized form gives exactly the weight that dequantizing at load stores (``Fp8Experts`` /
``Int4Experts.expert``), so the kernel's products are the dequantized model's. The host side
(``weight_args``) turns each kind into the kernel's pointer, stride and scale arguments."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

import torch
import triton
import triton.language as tl

from tandem.kernels.int4_layout import PACK
from tandem.kernels.w4a16 import MAGIC, MAGIC_VALUE

DENSE, FP8, INT4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
WORD = tl.constexpr(PACK)  # 4-bit values per int32 word, as the kernels read it


class Fp8ExpertWeights(Protocol):
    """FP8 experts as the kernel reads them (``model.quant.fp8_experts.Fp8Experts``; named by its
    fields so that kernels import nothing from the model): ``weight`` float8_e4m3fn [E, N, K], a float32
    ``scale`` grid [E, ceil(N / bn), ceil(K / bk)] and ``block`` (bn, bk)."""

    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size: ...


class Int4ExpertWeights(Protocol):
    """4-bit experts as the kernel reads them (``model.quant.int4_experts.Int4Experts``): ``qweight``
    int32 [E, K / 8, N], ``scales`` [E, K / G, N], ``zeros`` uint8 [E, K / G, N] or None (8), and
    ``group_size`` G; ``shape`` is [E, N, K]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int

    @property
    def shape(self) -> torch.Size: ...


ExpertWeight = Union[torch.Tensor, Fp8ExpertWeights, Int4ExpertWeights]


def weight_kind(w: ExpertWeight) -> int:
    if isinstance(w, torch.Tensor):
        return DENSE.value
    return INT4.value if hasattr(w, "qweight") else FP8.value


@dataclass(frozen=True)
class WeightArgs:
    """One GEMM's weight arguments. Element (n, k) of expert e: B at e * stride_be + n * stride_bn +
    k * stride_bk (4-bit: the word of k // 8); its scale at e * stride_se + (n // scale_bn) *
    stride_sn + (k // scale_bk) * stride_sk, its zero point at the same offset of ``z``. The up rows
    (w13's second half) lie ``up_offset`` elements of B and ``s_up_offset`` of the scales further."""

    kind: int
    b: torch.Tensor
    s: torch.Tensor  # dense: any tensor, never read
    z: torch.Tensor  # 4-bit with zero points only; else never read
    k_in: int
    strides_b: tuple[int, int, int]  # (e, n, k)
    strides_s: tuple[int, int, int]
    scale_block: tuple[int, int]  # (scale_bn, scale_bk)
    up_offset: int
    s_up_offset: int
    block_k: int
    scale_row: bool  # a K tile lies in one column of the scale grid: one scale per output column
    has_zeros: bool


def weight_args(w: ExpertWeight, n_out: int, block_k: int) -> WeightArgs:
    """The kernel's arguments for ``w`` (``n_out``: the output columns of one half of w13, or of
    w2); ``block_k`` is the tiles' K step, halved for 4-bit weights until it divides the group."""
    kind, k_in = weight_kind(w), w.shape[2]
    if kind == DENSE.value:
        return WeightArgs(kind, w, w, w, k_in, w.stride(), (0, 0, 0), (1, 1), n_out * w.stride(1), 0, block_k,
                          False, False)
    if kind == FP8.value:
        (bn, bk), s = w.block, w.scale
        return WeightArgs(kind, w.weight, s, s, k_in, w.weight.stride(), s.stride(), (bn, bk),
                          n_out * w.weight.stride(1), (n_out // bn) * s.stride(1), block_k,
                          bk >= k_in or bk % block_k == 0, False)
    q, s, g = w.qweight, w.scales, w.group_size
    while g % block_k:
        block_k //= 2
    z = s if w.zeros is None else w.zeros
    # words [E, K / 8, N] as (e, n, k-word) strides; scales [E, K / G, N] likewise
    return WeightArgs(kind, q, s, z, k_in, (q.stride(0), q.stride(2), q.stride(1)),
                      (s.stride(0), s.stride(2), s.stride(1)), (1, g), n_out * q.stride(2), n_out * s.stride(2),
                      block_k, True, w.zeros is not None)


def check_pair(w13: ExpertWeight, w2: ExpertWeight, dtype: torch.dtype) -> None:
    """ValueError unless w13 and w2 are of one kind the kernel reads as laid out."""
    kind = weight_kind(w13)
    if kind != weight_kind(w2):
        raise ValueError("fused MoE: w13 and w2 must be stored alike (both dense, both FP8 or both 4-bit)")
    if kind == DENSE.value and not (dtype == w13.dtype == w2.dtype):
        raise ValueError(f"fused MoE: hidden {dtype}, w13 {w13.dtype}, w2 {w2.dtype} must share one dtype")
    if kind == FP8.value and (w13.shape[1] // 2) % w13.block[0]:  # the up rows' scales must start on a grid row
        raise ValueError(f"fused MoE: FP8 w13 {list(w13.shape)} in {list(w13.block)} blocks: the up rows "
                         f"({w13.shape[1] // 2}) do not start on a block")
    for w in (w13, w2):
        if kind == INT4.value:
            parts = [w.qweight, w.scales] + ([] if w.zeros is None else [w.zeros])
            if not all(t.is_contiguous() for t in parts) or w.group_size % 16:
                raise ValueError(f"fused MoE: 4-bit experts {list(w.shape)} need contiguous words, scales and zero "
                                 f"points and groups a multiple of 16 channels (got {w.group_size})")
        elif (w if kind == DENSE.value else w.weight).stride(2) != 1:
            raise ValueError("fused MoE: expert weights must be contiguous in their last dimension")


@triton.jit
def weight_ptrs(b_ptr, cols, stride_bn, stride_bk, BLOCK_K: tl.constexpr, W_KIND: tl.constexpr):
    """(pointers of the first K tile of B, the step to the next): [BLOCK_K, BLOCK_N] elements, or
    for 4-bit weights [BLOCK_K / 8, BLOCK_N] words."""
    if W_KIND == INT4:
        rows = tl.arange(0, BLOCK_K // WORD)
        step = (BLOCK_K // WORD) * stride_bk
    else:
        rows = tl.arange(0, BLOCK_K)
        step = BLOCK_K * stride_bk
    return b_ptr + cols[None, :].to(tl.int64) * stride_bn + rows[:, None] * stride_bk, step


@triton.jit
def _int4_tile(b_ptrs, s_ptrs, z_ptrs, col_ok, k0, scale_bk, stride_sk, dt: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """Row 8r + i of the tile is nibble i of word row r; (q - zero) * scale of the tile's one group."""
    words = tl.load(b_ptrs, mask=col_ok[None, :], other=0)
    nibble = (tl.arange(0, WORD) * 4)[None, :, None]
    q = tl.reshape((words[:, None, :] >> nibble) & 0xF, (BLOCK_K, BLOCK_N))  # & drops the sign's shifted bits
    group = (k0 // scale_bk) * stride_sk
    s = tl.load(s_ptrs + group, mask=col_ok[None, :], other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zoff = tl.load(z_ptrs + group, mask=col_ok[None, :], other=0).to(tl.float32) + MAGIC_VALUE
    else:
        zoff = 8.0 + MAGIC_VALUE
    # q OR-ed into 2**23's bits is the float 2**23 + q: an OR instead of an int-to-float conversion
    # (a quarter-rate instruction), and q - zero stays exact (integers below 2**24)
    return (((q | MAGIC).to(tl.float32, bitcast=True) - zoff) * s).to(dt)


@triton.jit
def weight_tile(b_ptrs, s_ptrs, z_ptrs, k_ok, col_ok, k0, scale_bk, stride_sk, dt: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, W_KIND: tl.constexpr, SCALE_ROW: tl.constexpr,
                HAS_ZEROS: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of B in the model dtype ``dt`` (see the module docstring). FP8 with
    SCALE_ROW: the tile lies in one column of the grid (per-channel scales, or blocks a multiple of
    BLOCK_K wide), so one scale per output column is loaded rather than one per element. 4-bit
    tiles need no K mask: BLOCK_K divides the group, which divides K."""
    if W_KIND == INT4:
        b = _int4_tile(b_ptrs, s_ptrs, z_ptrs, col_ok, k0, scale_bk, stride_sk, dt, BLOCK_K, BLOCK_N, HAS_ZEROS)
    else:
        mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_ptrs, mask=mask, other=0.0)
        if W_KIND == FP8:
            if SCALE_ROW:
                s = tl.load(s_ptrs + (k0 // scale_bk) * stride_sk, mask=col_ok[None, :], other=0.0)
            else:
                ks = k0 + tl.arange(0, BLOCK_K)
                s = tl.load(s_ptrs + (ks // scale_bk)[:, None] * stride_sk, mask=mask, other=0.0)
            b = (b.to(tl.float32) * s).to(dt)
    return b
