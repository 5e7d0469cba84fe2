"""4-bit weight-only checkpoints (AWQ, GPTQ, compressed-tensors ``pack-quantized``) in one layout.

Each format packs eight 4-bit integers into an int32 its own way. ``Int4Weight`` is the one layout
the W4A16 kernel (``tandem/kernels/w4a16.py``) reads, GPTQ's in effect:

- ``qweight`` [K / 8, N] int32: nibble i (bits 4i..4i+3) of word [r, n] is the unsigned integer
  q in [0, 15] of input channel 8r + i, output channel n; a column of words is one output channel,
  so a tile of output channels reads contiguous memory;
- ``scales`` [K / G, N] and ``zeros`` [K / G, N] uint8 (None: symmetric, zero point 8) per group
  of G consecutive input channels: w[n, k] = (q - zero) * scale;
- ``perm`` [K] (or None): act-order checkpoints quantize channels in a permuted order, so a group
  is not a run of consecutive channels; sorting the channels by group makes it one. The weight's
  rows are stored in that sorted order and the activation is gathered the same way
  (``x[..., perm]``, one device gather) before the GEMM.

For each format a plain PyTorch ``dequantize_*`` reads the checkpoint's own tensors and gives the
float weight [N, K] (the reference the kernel and the tests compare with); ``dequantize`` does the
same from the common layout. Anything else (other bit widths, group sizes that are not a multiple of
32, AWQ without zero points, unequal act-order groups) is refused, naming it."""
from __future__ import annotations

import torch

from tandem.kernels.int4_layout import MIN_GROUP, PACK, Int4Weight  # noqa: F401 (the layout this module fills)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's nibble i holds output channel 8c + AWQ_ORDER[i]


def unpack_nibbles(words: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(PACK))) -> torch.Tensor:
    """int32 words -> uint8 values, eight per word along ``dim``: value 8c + order[i] of the result
    is nibble i of word c (``order`` is the identity for GPTQ and compressed-tensors)."""
    if words.dtype != torch.int32:
        raise ValueError(f"4-bit weights: packed tensor has dtype {words.dtype}, expected int32")
    words = words.movedim(dim, -1)
    out = torch.empty(*words.shape, PACK, dtype=torch.uint8, device=words.device)
    for i, slot in enumerate(order):
        out[..., slot] = ((words >> (4 * i)) & 0xF).to(torch.uint8)  # & drops the arithmetic shift's sign bits
    return out.flatten(-2).movedim(-1, dim)


def pack_nibbles(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of ``unpack_nibbles`` in identity order: values in [0, 15] -> int32 words along ``dim``."""
    values = values.movedim(dim, -1)
    if values.shape[-1] % PACK:
        raise ValueError(f"4-bit weights: {values.shape[-1]} channels to pack is not a multiple of {PACK}")
    groups = values.to(torch.int64).unflatten(-1, (-1, PACK))
    words = (groups << (4 * torch.arange(PACK, device=values.device))).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the unsigned word as int32's bits
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def _check_group(group_size: int, k: int) -> int:
    """The group size actually used (-1 or K: one group per output channel), refused unless the kernel reads it."""
    group = k if group_size in (-1, k) else group_size
    if group <= 0 or group % MIN_GROUP or k % group:
        raise ValueError(f"4-bit weights: group_size {group_size} is not implemented for {k} input channels "
                         f"(a multiple of {MIN_GROUP} dividing them, or -1)")
    return group


def _act_order(g_idx: torch.Tensor | None, k: int, group: int) -> torch.Tensor | None:
    """The permutation sorting input channels by group (None when they already are), refused unless
    every group then holds exactly ``group`` consecutive channels."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int64).flatten()
    if g_idx.numel() != k:
        raise ValueError(f"4-bit weights: g_idx has {g_idx.numel()} entries for {k} input channels")
    perm = torch.argsort(g_idx, stable=True)
    expected = torch.arange(k, device=g_idx.device) // group
    if not torch.equal(g_idx[perm], expected):
        raise ValueError("4-bit weights: act-order g_idx whose groups are not all of group_size channels "
                         "is not implemented")
    return None if torch.equal(perm, torch.arange(k, device=perm.device)) else perm


def _canonical(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
               perm: torch.Tensor | None) -> Int4Weight:
    """From unpacked q [K, N] (original channel order), per-group scales/zeros [K / G, N]."""
    if perm is not None:
        q = q.index_select(0, perm)
    if zeros is not None and bool((zeros == 8).all()):
        zeros = None  # symmetric: the kernel's constant zero point, no bytes read
    return Int4Weight(pack_nibbles(q, 0).contiguous(), scales.contiguous(),
                      None if zeros is None else zeros.to(torch.uint8).contiguous(), group, perm)


def _expand(per_group: torch.Tensor, group: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """[K / G, N] -> [K, N]: each input channel's row (its group's)."""
    k = per_group.shape[0] * group
    index = torch.arange(k, device=per_group.device) // group if g_idx is None else g_idx.to(torch.int64)
    return per_group.index_select(0, index)


def _dequant(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-channel q, zeros, scales [K, N] -> W [N, K]: (q - zero) * scale in float32, rounded once to
    the scales' dtype (the kernel's rounding: it dequantizes in float32 into the activations' dtype)."""
    return ((q.float() - zeros.float()) * scales.float()).to(scales.dtype).t().contiguous()


# --- AWQ (AutoAWQ's GEMM layout): qweight [K, N / 8], qzeros [K / G, N / 8], scales [K / G, N] ---

def _awq_ints(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    k, n = qweight.shape[0], scales.shape[1]
    group = _check_group(group_size, k)
    if qweight.shape != (k, n // PACK) or qzeros.shape != (k // group, n // PACK) or scales.shape[0] != k // group:
        raise ValueError(f"AWQ: shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)}, group_size {group_size}")
    return unpack_nibbles(qweight, 1, AWQ_ORDER), unpack_nibbles(qzeros, 1, AWQ_ORDER), group


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    q, zeros, group = _awq_ints(qweight, qzeros, scales, group_size)
    return _canonical(q, scales, zeros, group, None)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    q, zeros, group = _awq_ints(qweight, qzeros, scales, group_size)
    return _dequant(q, _expand(zeros, group, None), _expand(scales, group, None))


# --- GPTQ (AutoGPTQ / GPTQModel): qweight [K / 8, N], qzeros [K / G, N / 8], scales [K / G, N], g_idx [K] ---
# Format "gptq" (v1, what most hub checkpoints hold) stores each zero point minus one; "gptq_v2" does not.

def _gptq_ints(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
               group_size: int, v2: bool):
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    group = _check_group(group_size, k)
    if qzeros.shape != (k // group, n // PACK) or scales.shape != (k // group, n):
        raise ValueError(f"GPTQ: shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)}, group_size {group_size}")
    zeros = unpack_nibbles(qzeros, 1)
    if not v2:
        zeros = zeros + 1  # v1's off-by-one: a stored 15 means 16, as the GPTQ kernels read it
    return unpack_nibbles(qweight, 0), zeros, group


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                group_size: int, v2: bool = False) -> Int4Weight:
    q, zeros, group = _gptq_ints(qweight, qzeros, scales, g_idx, group_size, v2)
    return _canonical(q, scales, zeros, group, _act_order(g_idx, q.shape[0], group))


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    group_size: int, v2: bool = False) -> torch.Tensor:
    q, zeros, group = _gptq_ints(qweight, qzeros, scales, g_idx, group_size, v2)
    return _dequant(q, _expand(zeros, group, g_idx), _expand(scales, group, g_idx))


# --- compressed-tensors pack-quantized: weight_packed [N, K / 8] of q + 8 (q signed in [-8, 7]),
# weight_scale [N, K / G], weight_zero_point (asymmetric only) packed along N [N / 8, K / G] int32 by
# current versions or int8 [N, K / G] by older ones, weight_g_idx [K] for actorder "group". ---

def _ct_ints(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
             weight_shape: torch.Tensor | tuple[int, int], group_size: int):
    n, k = (int(d) for d in weight_shape)
    group = _check_group(group_size, k)
    if weight_packed.shape != (n, k // PACK) or weight_scale.shape != (n, k // group):
        raise ValueError(f"compressed-tensors pack-quantized: shapes disagree: weight_packed "
                         f"{tuple(weight_packed.shape)}, weight_scale {tuple(weight_scale.shape)}, "
                         f"weight_shape {(n, k)}, group_size {group_size}")
    q = unpack_nibbles(weight_packed, 1).t()  # [K, N], unsigned (q + 8)
    if weight_zero_point is None:
        zeros = torch.full((k // group, n), 8, dtype=torch.uint8, device=q.device)
    elif weight_zero_point.dtype == torch.int32 and weight_zero_point.shape == (n // PACK, k // group):
        zeros = unpack_nibbles(weight_zero_point, 0).t()  # packed with the same +8 offset
    elif weight_zero_point.shape == (n, k // group) and not weight_zero_point.is_floating_point():
        zeros = (weight_zero_point.to(torch.int16) + 8).to(torch.uint8).t()  # older versions: signed, unpacked
    else:
        raise ValueError(f"compressed-tensors pack-quantized: weight_zero_point {tuple(weight_zero_point.shape)} "
                         f"{weight_zero_point.dtype} is not a layout this loader reads")
    return q, zeros, weight_scale.t(), group


def unpack_compressed(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor | tuple[int, int],
                      group_size: int, weight_zero_point: torch.Tensor | None = None,
                      weight_g_idx: torch.Tensor | None = None) -> Int4Weight:
    q, zeros, scales, group = _ct_ints(weight_packed, weight_scale, weight_zero_point, weight_shape, group_size)
    return _canonical(q, scales, zeros, group, _act_order(weight_g_idx, q.shape[0], group))


def dequantize_compressed(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor | tuple[int, int],
                          group_size: int, weight_zero_point: torch.Tensor | None = None,
                          weight_g_idx: torch.Tensor | None = None) -> torch.Tensor:
    q, zeros, scales, group = _ct_ints(weight_packed, weight_scale, weight_zero_point, weight_shape, group_size)
    return _dequant(q, _expand(zeros, group, weight_g_idx), _expand(scales, group, weight_g_idx))


def quantize_rtn(w: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Round-to-nearest symmetric 4-bit weights of a dense [N, K] weight (quantization at load): per
    group of ``group_size`` input channels and output channel, scale = largest magnitude / 7 and
    q = round(w / scale) + 8, clamped to [1, 15] (so -7..7: symmetric, the zero point 8 implied). No
    calibration data: a checkpoint quantized by GPTQ or AWQ keeps more accuracy."""
    n, k = w.shape
    group = _check_group(group_size, k)
    grouped = w.float().t().reshape(k // group, group, n)  # [K / G, G, N]
    scales = (grouped.abs().amax(dim=1) / 7.0).clamp(min=torch.finfo(torch.float32).tiny)  # [K / G, N]
    q = (grouped / scales[:, None, :]).round().clamp(-7, 7) + 8
    return Int4Weight(pack_nibbles(q.reshape(k, n).to(torch.uint8), 0), scales.to(w.dtype).contiguous(), None, group)


def dequantize(w: Int4Weight) -> torch.Tensor:
    """The common layout's float weight [N, K] in the checkpoint's channel order."""
    q = unpack_nibbles(w.qweight, 0)  # [K, N], sorted by group when ``perm`` is set
    zeros = torch.full_like(w.scales, 8, dtype=torch.uint8) if w.zeros is None else w.zeros
    dense = _dequant(q, _expand(zeros, w.group_size, None), _expand(w.scales, w.group_size, None))
    if w.perm is None:
        return dense
    out = torch.empty_like(dense)
    out[:, w.perm] = dense  # sorted column i is the checkpoint's channel perm[i]
    return out
