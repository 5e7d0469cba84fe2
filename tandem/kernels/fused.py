"""Fused elementwise kernels for the decoder layer, each one pass over its tensors.

Each reproduces the rounding order of the torch reference in ``tandem.model.layers`` (the one
transformers uses): float32 statistics, results rounded to the model dtype where the reference
rounds, so bf16 outputs match it up to a last-bit difference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(x_ptr + row * n_cols + cols, mask=ok, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0).to(tl.float32))
        h = h.to(res_out_ptr.dtype.element_ty)  # the residual sum is rounded to the model dtype
        tl.store(res_out_ptr + row * n_cols + cols, h, mask=ok)
    hf = h.to(tl.float32)
    normed = hf * tl.rsqrt(tl.sum(hf * hf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    out = w * normed.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual: [T, H] contiguous."""
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(n_rows,)](x, residual if residual is not None else x, weight, out, res_out, n_cols, eps,
                                    HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n_cols),
                                    num_warps=4 if n_cols <= 2048 else 8)
    return out, res_out


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_tok, stride_head, n_heads,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok)
    d = tl.arange(0, HALF_PAD)
    heads = tl.arange(0, HEADS_PAD)
    ok = (heads[:, None] < n_heads) & (d[None, :] < HALF)
    # cos/sin tables hold [cos(f), cos(f)] halves alike: the first half serves both
    cos = tl.load(cos_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + tok * stride_tok + heads[:, None] * stride_head + d[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    dt = x1.dtype
    # reference: x * cos + rotate_half(x) * sin, each product rounded to the dtype, then the sum
    o1 = (x1.to(tl.float32) * cos).to(dt).to(tl.float32) + (-x2.to(tl.float32) * sin).to(dt).to(tl.float32)
    o2 = (x2.to(tl.float32) * cos).to(dt).to(tl.float32) + (x1.to(tl.float32) * sin).to(dt).to(tl.float32)
    tl.store(base, o1.to(dt), mask=ok)
    tl.store(base + HALF, o2.to(dt), mask=ok)


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, heads, head_dim] (any token/head strides, unit last stride) in place."""
    n_tok, n_heads, head_dim = x.shape
    half = head_dim // 2
    _rope_kernel[(n_tok,)](x, positions, cos, sin, x.stride(0), x.stride(1), n_heads, HALF=half,
                           HALF_PAD=triton.next_power_of_2(half), HEADS_PAD=triton.next_power_of_2(n_heads))
    return x


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu rounded to the dtype, as F.silu is
    tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]: [T, 2I] contiguous -> [T, I]."""
    n_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](gate_up, out, n_cols, BLOCK=block)
    return out
