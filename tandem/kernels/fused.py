"""Fused elementwise kernels for the decoder layer, each one pass over its tensors.

Each reproduces the rounding order of the torch reference in ``tandem.model.layers`` (the one
transformers uses): float32 statistics, results rounded to the model dtype where the reference
rounds, so bf16 outputs match it up to a last-bit difference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.fp8_formats import FP8_FORMATS
from tandem.kernels.pdl import pdl_launch, wait_then_release


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
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
                                    num_warps=4 if n_cols <= 2048 else 8, **pdl_launch(x.device))
    return out, res_out


@triton.jit
def _rotate(x1, x2, cos, sin):
    """The reference's rotation: x * cos + rotate_half(x) * sin, each product rounded to the dtype,
    then the sum (x1, x2: the two halves of each head)."""
    dt = x1.dtype
    o1 = (x1.to(tl.float32) * cos).to(dt).to(tl.float32) + (-x2.to(tl.float32) * sin).to(dt).to(tl.float32)
    o2 = (x2.to(tl.float32) * cos).to(dt).to(tl.float32) + (x1.to(tl.float32) * sin).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _round_to_fp8_grid(x, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """x (float32, within the format's range) rounded to nearest even onto the values of an fp8 format
    with ``MANTISSA`` bits and least normal exponent ``MIN_EXP`` (e4m3: 3, -6; e5m2: 2, -14), in
    float32: adding and subtracting 1.5 * 2^23 ulp rounds to a multiple of ulp. The cast that follows
    is then exact. Done by hand because Triton's interpreter (CI's kernel path) rounds fp32 -> fp8
    wrongly (half-up, and a carry into the exponent gets lost); the GPU's own conversion would agree
    with this."""
    exp = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased
    ulp_exp = tl.maximum(exp, 127 + MIN_EXP) - MANTISSA  # biased exponent of the format's step at x
    magic = (((ulp_exp + 23) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (x + magic) - magic
    return tl.where(r == 0, x * 0.0, r)  # keeps the sign of a value that rounds to zero, as a cast does


@triton.jit
def _to_cache(x, scale, c_ptr, FP8_MANTISSA: tl.constexpr, FP8_MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr):
    """x as the cache holds it: as it is (``FP8_MANTISSA`` 0), or for an fp8 cache x / scale in
    float32, saturated to the format's largest finite value (a plain cast would give NaN or infinity),
    rounded to nearest even (``layers.kv.to_cache_dtype``)."""
    if FP8_MANTISSA:
        saturated = tl.clamp(x.to(tl.float32) / scale, -FP8_MAX, FP8_MAX)
        return _round_to_fp8_grid(saturated, FP8_MANTISSA, FP8_MIN_EXP).to(c_ptr.dtype.element_ty)
    return x.to(c_ptr.dtype.element_ty)  # the cache's dtype is the model's: no conversion


def fp8_constants(cache_dtype: torch.dtype) -> dict:
    """``_to_cache``'s constexprs for a cache of ``cache_dtype`` (all zero: not fp8)."""
    fmt = FP8_FORMATS.get(cache_dtype)
    if fmt is None:
        return dict(FP8_MANTISSA=0, FP8_MIN_EXP=0, FP8_MAX=0.0)
    return dict(FP8_MANTISSA=fmt.mantissa, FP8_MIN_EXP=fmt.min_exp, FP8_MAX=fmt.max)


@triton.jit
def _rope_store_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                          stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
                          stride_c_slot, stride_c_head, n_q_heads, n_kv_heads, k_scale, v_scale,
                          HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_PAD: tl.constexpr, KV_PAD: tl.constexpr,
                          FP8_MANTISSA: tl.constexpr, FP8_MIN_EXP: tl.constexpr, FP8_MAX: tl.constexpr,
                          PDL: tl.constexpr):
    wait_then_release(PDL)
    tok = tl.program_id(0)
    pos = tl.load(pos_ptr + tok)
    slot = tl.load(slot_ptr + tok)  # int64: slot * stride stays in range on large caches
    d = tl.arange(0, HALF_PAD)
    d_ok = d[None, :] < HALF
    cos = tl.load(cos_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    qh = tl.arange(0, Q_PAD)[:, None]
    q_ok = (qh < n_q_heads) & d_ok
    q_base = q_ptr + tok * stride_q_tok + qh * stride_q_head + d[None, :]
    o1, o2 = _rotate(tl.load(q_base, mask=q_ok, other=0.0), tl.load(q_base + HALF, mask=q_ok, other=0.0), cos, sin)
    tl.store(q_base, o1, mask=q_ok)
    tl.store(q_base + HALF, o2, mask=q_ok)
    kh = tl.arange(0, KV_PAD)[:, None]
    kv_ok = (kh < n_kv_heads) & d_ok
    k_base = k_ptr + tok * stride_k_tok + kh * stride_k_head + d[None, :]
    c_off = slot * stride_c_slot + kh * stride_c_head + d[None, :]
    o1, o2 = _rotate(tl.load(k_base, mask=kv_ok, other=0.0), tl.load(k_base + HALF, mask=kv_ok, other=0.0), cos, sin)
    v_base = v_ptr + tok * stride_v_tok + kh * stride_v_head + d[None, :]
    v1, v2 = tl.load(v_base, mask=kv_ok, other=0.0), tl.load(v_base + HALF, mask=kv_ok, other=0.0)
    tl.store(kc_ptr + c_off, _to_cache(o1, k_scale, kc_ptr, FP8_MANTISSA, FP8_MIN_EXP, FP8_MAX), mask=kv_ok)
    tl.store(kc_ptr + c_off + HALF, _to_cache(o2, k_scale, kc_ptr, FP8_MANTISSA, FP8_MIN_EXP, FP8_MAX), mask=kv_ok)
    tl.store(vc_ptr + c_off, _to_cache(v1, v_scale, vc_ptr, FP8_MANTISSA, FP8_MIN_EXP, FP8_MAX), mask=kv_ok)
    tl.store(vc_ptr + c_off + HALF, _to_cache(v2, v_scale, vc_ptr, FP8_MANTISSA, FP8_MIN_EXP, FP8_MAX), mask=kv_ok)


def rope_store_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> torch.Tensor:
    """One pass per token: rotate q in place, and write rotated k and v into the layer's cache
    [2, slots, Hkv, D] at ``slot_mapping`` (q, k, v: strided views of one QKV projection); a
    fp8 cache (e4m3 or e5m2) gets k / k_scale and v / v_scale (``tandem.model.layers.kv.store_kv``)."""
    n_tok, n_q, head_dim = q.shape
    n_kv, half = k.shape[1], head_dim // 2
    k_cache, v_cache = cache[0], cache[1]
    _rope_store_kv_kernel[(n_tok,)](
        q, k, v, positions, slot_mapping, cos, sin, k_cache, v_cache, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), n_q, n_kv, k_scale, v_scale,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), Q_PAD=triton.next_power_of_2(n_q),
        KV_PAD=triton.next_power_of_2(n_kv), **fp8_constants(cache.dtype), **pdl_launch(q.device))
    return q


@triton.jit
def silu_times(g, u):
    """silu(g) * u in g's dtype, rounded where the reference rounds: silu to the dtype (as F.silu
    is), then the product."""
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, silu_times(g, u), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]: [T, 2I] contiguous -> [T, I]."""
    n_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty(n_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](gate_up, out, n_cols, BLOCK=block, **pdl_launch(gate_up.device))
    return out
