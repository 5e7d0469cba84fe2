"""Fused Gemma norms and MLP activation (issue 28): each one pass over its rows.

Gemma's RMSNorm normalises and scales in float32 and rounds last (``tandem.model.layers.norms.
gemma_rms_norm``; the Llama kernel in ``fused.py`` rounds before it scales, so it cannot serve). These
kernels keep the torch reference's rounding points: the normed value rounded to the model dtype
before it joins the stream, the stream's sum computed in float32 and rounded once (what torch's
bf16 + bf16 does), the GELU rounded to the dtype before it multiplies ``up`` (what ``F.gelu``
followed by ``*`` does). What can differ is float32 arithmetic order inside a row (the sum of
squares, the tanh), so bf16 outputs match up to a last-bit difference on rare elements.

For float32, bfloat16 and float16 tensors (the model picks the torch layers for float64)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# F.gelu(approximate="tanh")'s constants: sqrt(2 / pi) and the cubic's coefficient
_GELU_BETA = tl.constexpr(0.7978845608028654)
_GELU_KAPPA = tl.constexpr(0.044715)
# The norms keep every product rounded before the sum that follows, as torch's separate kernels do
# (mean * 1/n, then + eps; in float32 the normed value, then + residual): no mul+add fused into an
# FMA. GELU lets them fuse, as nvcc (--fmad=true by default) builds torch's GELU kernel.
_UNFUSED, _FUSED = dict(enable_fp_fusion=False), dict(enable_fp_fusion=True)


@triton.jit
def _normed(xf, factor, inv_n, eps):
    """Gemma's RMSNorm of float32 rows [R, C] (zero past the row's end), unrounded: x * rsqrt(mean(x^2)
    + eps), then times the float32 factor (1 + w), in the reference's order. The mean multiplies by
    1/n, as torch's CUDA mean does."""
    ms = tl.sum(xf * xf, 1)[:, None] * inv_n
    return xf * tl.rsqrt(ms + eps) * factor


@triton.jit
def _rms_norm_kernel(x_ptr, f_ptr, out_ptr, stride_tok, stride_head, n_heads, n_cols, inv_n, eps,
                     HEADS: tl.constexpr, BLOCK: tl.constexpr):
    """One token's heads [n_heads, n_cols] (one head for a hidden-state row) per program."""
    tok = tl.program_id(0)
    heads = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    ok = (heads < n_heads) & (cols < n_cols)
    x = tl.load(x_ptr + tok * stride_tok + heads * stride_head + cols, mask=ok, other=0.0)
    factor = tl.load(f_ptr + cols, mask=cols < n_cols, other=0.0)
    out = _normed(x.to(tl.float32), factor, inv_n, eps)
    tl.store(out_ptr + (tok * n_heads + heads) * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def gemma_rms_norm(x: torch.Tensor, factor: torch.Tensor, eps: float) -> torch.Tensor:
    """``norms.gemma_rms_norm`` for x [T, H] or [T, heads, D] (per-head q/k norms: x may be a strided
    view of the QKV projection, its last dimension contiguous); ``factor`` float32 (1 + w). Returns a
    new contiguous tensor of x's shape and dtype."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    n_tok, n_heads, n_cols = x3.shape
    assert x3.stride(2) == 1, "the normed dimension must be contiguous"
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    heads, block = triton.next_power_of_2(n_heads), triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(n_tok,)](x3, factor, out, x3.stride(0), x3.stride(1), n_heads, n_cols, 1.0 / n_cols, eps,
                               HEADS=heads, BLOCK=block, num_warps=_warps(heads * block), **_UNFUSED)
    return out


@triton.jit
def _norm_add_norm_kernel(x_ptr, res_ptr, f_in_ptr, f_out_ptr, out_ptr, stream_ptr, stride_x, stride_res,
                          n_cols, inv_n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    ok = cols < n_cols
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    normed = _normed(x, tl.load(f_in_ptr + cols, mask=ok, other=0.0), inv_n, eps).to(dt)  # a tensor in the reference
    res = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
    stream = (res.to(tl.float32) + normed.to(tl.float32)).to(dt)  # torch's 16-bit add: float32, rounded once
    tl.store(stream_ptr + row * n_cols + cols, stream, mask=ok)
    out = _normed(stream.to(tl.float32), tl.load(f_out_ptr + cols, mask=ok, other=0.0), inv_n, eps)
    tl.store(out_ptr + row * n_cols + cols, out.to(dt), mask=ok)


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, f_in: torch.Tensor, f_out: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemma_rms_norm(stream, f_out), stream) with stream = residual + gemma_rms_norm(x, f_in), for
    x, residual [T, H] (rows contiguous): a Gemma layer's post-attention norm, add and
    pre-feedforward norm, or the previous layer's post-feedforward norm, add and input norm."""
    n_rows, n_cols = x.shape
    assert x.stride(1) == 1 and residual.stride(1) == 1, "rows must be contiguous"
    out = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    stream = torch.empty_like(out)
    block = triton.next_power_of_2(n_cols)
    _norm_add_norm_kernel[(n_rows,)](x, residual, f_in, f_out, out, stream, x.stride(0), residual.stride(0), n_cols,
                                     1.0 / n_cols, eps, BLOCK=block, num_warps=_warps(block), **_UNFUSED)
    return out, stream


@triton.jit
def _gelu_tanh(g):
    """F.gelu(approximate="tanh") in float32: 0.5 * g * (1 + tanh(beta * (g + kappa * g^3))), as
    torch writes it. tanh from exp (the interpreter has no tanh), odd by construction, with
    exp(-2|y|) <= 1 so it never overflows."""
    inner = _GELU_BETA * (g + _GELU_KAPPA * (g * g * g))
    e = tl.exp(-2.0 * tl.abs(inner))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(inner < 0, -t, t)
    return 0.5 * g * (1.0 + t)


@triton.jit
def _gelu_tanh_mul_kernel(gu_ptr, out_ptr, stride_gu, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=ok, other=0.0)
    act = _gelu_tanh(g.to(tl.float32)).to(g.dtype)  # F.gelu returns the dtype: rounded before the product
    tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``mlp.gelu_tanh_mul``: gelu_tanh(gate) * up for gate_up = [gate | up] [T, 2I] (rows contiguous)
    -> [T, I]."""
    n_rows, width = gate_up.shape
    assert gate_up.stride(1) == 1, "rows must be contiguous"
    n_cols = width // 2
    out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _gelu_tanh_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](gate_up, out, gate_up.stride(0), n_cols,
                                                                BLOCK=block, **_FUSED)
    return out


def _warps(elements: int) -> int:
    """Warps for a program holding ``elements`` values: about 16 a thread (the row in registers)."""
    return max(1, min(16, elements // 512))
