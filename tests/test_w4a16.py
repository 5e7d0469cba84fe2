"""4-bit weights: the unpacking of AWQ, GPTQ and compressed-tensors pack-quantized checkpoints
(tandem/model/quant/int4.py) and the W4A16 kernel (tandem/kernels/w4a16.py).

The packers here write random integers the way AutoAWQ, AutoGPTQ and compressed-tensors lay them
out (word by word, nibble by nibble, in numpy uint32 like those tools), independently of the
module's own helpers; each format's ``dequantize_*`` must give back exactly (q - zero) * scale of
the integers drawn. The kernel runs through Triton's interpreter in a subprocess (TRITON_INTERPRET
must be set before Triton is imported), float32, against x @ dequantize(...)^T."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.model.quant import int4

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _words(values: np.ndarray, along: int, order: list[int]) -> np.ndarray:
    """Pack values in [0, 15] eight per uint32 along axis ``along``: nibble i of word c holds value
    8c + order[i]; returned as int32 (the bits safetensors stores)."""
    v = np.moveaxis(values.astype(np.uint32), along, -1)
    out = np.zeros(v.shape[:-1] + (v.shape[-1] // 8,), dtype=np.uint32)
    for c in range(out.shape[-1]):
        for i in range(8):
            out[..., c] |= v[..., 8 * c + order[i]] << np.uint32(4 * i)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, along)).view(np.int32))


@dataclass
class Drawn:
    """Random integers of one linear: q [K, N] unsigned, zeros [K/G, N], scales [K/G, N], the group
    of each input channel, and the float weight [N, K] they mean."""
    q: np.ndarray
    zeros: np.ndarray
    scales: torch.Tensor
    group_of: torch.Tensor
    g_idx: torch.Tensor | None

    def weight(self) -> torch.Tensor:
        z = torch.from_numpy(self.zeros.astype(np.float32))[self.group_of]
        return ((torch.from_numpy(self.q.astype(np.float32)) - z) * self.scales.float()[self.group_of]).t()


def _draw(seed: int, k: int, n: int, group: int, act_order: bool = False, zero_range=(0, 16)) -> Drawn:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k, n))
    zeros = rng.integers(*zero_range, (k // group, n))
    scales = torch.from_numpy(rng.uniform(0.002, 0.05, (k // group, n)).astype(np.float32))
    if act_order:  # quantized in a random channel order: channel perm[i] falls in group i // G
        perm = rng.permutation(k)
        g_idx = np.empty(k, dtype=np.int64)
        g_idx[perm] = np.arange(k) // group
        g = torch.from_numpy(g_idx)
        return Drawn(q, zeros, scales, g, g.to(torch.int32))
    return Drawn(q, zeros, scales, torch.arange(k) // group, None)


def pack_awq(d: Drawn) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: qweight [K, N/8] and qzeros [K/G, N/8] in AWQ's interleaved nibble order."""
    return {"qweight": _words(d.q, 1, AWQ_ORDER), "qzeros": _words(d.zeros, 1, AWQ_ORDER), "scales": d.scales}


def pack_gptq(d: Drawn, v2: bool = False) -> dict[str, torch.Tensor]:
    """AutoGPTQ's layout: qweight [K/8, N] packed along K, qzeros [K/G, N/8] holding zero - 1 (v1)."""
    stored = d.zeros if v2 else d.zeros - 1
    out = {"qweight": _words(d.q, 0, list(range(8))), "qzeros": _words(stored, 1, list(range(8))),
           "scales": d.scales}
    k, groups = d.q.shape[0], d.zeros.shape[0]
    out["g_idx"] = d.g_idx if d.g_idx is not None else (torch.arange(k) // (k // groups)).int()  # trivial order
    return out


def pack_compressed(d: Drawn, symmetric: bool, packed_zero: bool = True) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: signed q + 8 packed along K of the [N, K] weight; asymmetric
    zero points (signed) packed along N, or int8 unpacked as older versions wrote them."""
    n, k = d.q.shape[1], d.q.shape[0]
    out = {"weight_packed": _words(d.q.T, 1, list(range(8))), "weight_scale": d.scales.t().contiguous(),
           "weight_shape": torch.tensor([n, k])}
    if not symmetric:
        signed = d.zeros.T.astype(np.int64) - 8
        out["weight_zero_point"] = (_words(signed + 8, 0, list(range(8))) if packed_zero
                                    else torch.from_numpy(signed.astype(np.int8)))
    if d.g_idx is not None:
        out["weight_g_idx"] = d.g_idx
    return out


def _cases():
    """(name, drawn, dequantize(), unpack()) over the layouts and their options."""
    k, n = 256, 48
    for group in (128, 32, -1):
        g = k if group == -1 else group
        d = _draw(1, k, n, g)
        t = pack_awq(d)
        yield f"awq g{group}", d, lambda t=t, g=group: int4.dequantize_awq(**t, group_size=g), \
            lambda t=t, g=group: int4.unpack_awq(**t, group_size=g)
    for act, v2, group in ((False, False, 128), (True, False, 128), (True, True, 64), (False, True, -1)):
        d = _draw(2, k, n, k if group == -1 else group, act, zero_range=(0, 16) if v2 else (1, 16))
        t = pack_gptq(d, v2)
        yield f"gptq act={act} v2={v2} g{group}", d, \
            lambda t=t, g=group, v2=v2: int4.dequantize_gptq(**t, group_size=g, v2=v2), \
            lambda t=t, g=group, v2=v2: int4.unpack_gptq(**t, group_size=g, v2=v2)
    for sym, packed, act in ((True, True, False), (False, True, False), (False, False, True), (True, True, True)):
        d = _draw(3, k, n, 128, act, zero_range=(8, 9) if sym else (0, 16))
        t = pack_compressed(d, sym, packed)
        yield f"ct sym={sym} packed_zp={packed} act={act}", d, \
            lambda t=t: int4.dequantize_compressed(**t, group_size=128), \
            lambda t=t: int4.unpack_compressed(**t, group_size=128)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_dequantize_matches_packed_integers(case):
    name, drawn, dequantize, unpack = case
    ref = drawn.weight()
    assert torch.equal(dequantize(), ref), name
    w = unpack()
    assert torch.equal(int4.dequantize(w), ref), name  # the common layout means the same weight
    assert w.qweight.shape == (256 // 8, 48) and w.qweight.dtype == torch.int32
    assert (w.perm is not None) == (drawn.g_idx is not None), name


def test_pack_nibbles_roundtrip_and_symmetric_zeros():
    q = torch.randint(0, 16, (64, 24), dtype=torch.uint8)
    assert torch.equal(int4.unpack_nibbles(int4.pack_nibbles(q, 0), 0), q)
    assert torch.equal(int4.unpack_nibbles(int4.pack_nibbles(q, 1), 1), q)
    d = _draw(4, 64, 16, 32, zero_range=(8, 9))  # all zero points 8: stored as the kernel's constant
    assert int4.unpack_gptq(**pack_gptq(d, v2=True), group_size=32, v2=True).zeros is None
    assert int4.unpack_awq(**pack_awq(_draw(4, 64, 16, 32)), group_size=32).zeros is not None


def test_refusals_name_the_setting():
    d = _draw(5, 96, 16, 32)
    with pytest.raises(ValueError, match="group_size 48"):
        int4.unpack_gptq(**pack_gptq(d), group_size=48)
    with pytest.raises(ValueError, match="group_size 16"):
        int4.unpack_awq(**pack_awq(_draw(5, 96, 16, 16)), group_size=16)
    t = pack_gptq(d)
    t["g_idx"] = torch.zeros(96, dtype=torch.int32)  # every channel in group 0: groups of unequal size
    with pytest.raises(ValueError, match="act-order"):
        int4.unpack_gptq(**t, group_size=32)
    t = pack_awq(d)
    with pytest.raises(ValueError, match="AWQ: shapes disagree"):
        int4.unpack_awq(t["qweight"], t["qzeros"][:1], t["scales"], group_size=32)


KERNEL = r"""
import sys, torch
sys.path.insert(0, TESTS)
from test_w4a16 import _cases
from tandem.kernels.w4a16 import W4Tiles, w4a16_matmul, w4a16_tiles
from tandem.model.quant.int4 import Int4Weight, dequantize

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

torch.manual_seed(0)
errs = []
# split-K, uneven splits, both ways of unpacking the nibbles
forced = [None, W4Tiles(16, 32, 32, 4, 4, 1, load_once=False), W4Tiles(32, 64, 32, 3, 4, 1),
          W4Tiles(4, 32, 32, 2, 4, 1, gemv=True)]
for i, (name, drawn, deq, unpack) in enumerate(_cases()):
    w, ref_w = unpack(), deq()
    for m in (1, 5, 17, 70)[: 4 if i % 3 == 0 else 2]:
        tiles = forced[(i + m) % 4]
        # the one-row kernel takes a row per program: three rows prove the row indexing, more cost only time
        x = torch.randn(min(m, 3) if tiles is not None and tiles.gemv else m, 256)
        out, ref = w4a16_matmul(x, w, tiles), x @ ref_w.t()
        errs.append(rel(out, ref))
        assert errs[-1] < 1e-5, (name, x.shape[0], tiles, errs[-1])
# leading dimensions, the tiers' own choices, an empty batch, half precision
name, drawn, deq, unpack = next(_cases())
w = unpack()
x = torch.randn(2, 3, 256)
assert rel(w4a16_matmul(x, w), x @ deq().t()) < 1e-5
assert w4a16_matmul(x[:0], w).shape == (0, 3, 48)
# the packed words dense along K (the layout Int4Linear keeps on the device) give the same result
along_k = Int4Weight(w.qweight.t().contiguous().t(), w.scales, w.zeros, w.group_size)
assert torch.equal(w4a16_matmul(x, along_k), w4a16_matmul(x, w))
try:  # a view dense along neither dimension cannot be indexed by two strides of which one is 1: refused
    w4a16_matmul(x, Int4Weight(torch.cat([w.qweight, w.qweight], 1)[:, ::2], w.scales, w.zeros, w.group_size))
    raise SystemExit("a strided qweight was accepted")
except ValueError as e:
    assert "dense along N or along K" in str(e)
assert w4a16_tiles(1, 4096, 4096, 128).split_k > 1 and w4a16_tiles(2000, 4096, 4096, 128).split_k == 1
w16 = w.to("cpu", torch.float16)
x16 = torch.randn(9, 256).half()
ref16 = (x16.float() @ dequantize(w16).float().t())
assert rel(w4a16_matmul(x16, w16).float(), ref16) < 2e-3
# gated: the input silu(gate) * up, fused into the one-row kernel's loads, computed first by the other
# tiers and under act order; the reference rounds where the fused kernel does (float16 here)
gate_up = torch.randn(5, 512).half() * 2
for rows, tiles in ((1, None), (1, W4Tiles(1, 32, 32, 3, 4, 1, gemv=True)), (5, None)):
    g, u = gate_up[:rows, :256], gate_up[:rows, 256:]
    act = (torch.nn.functional.silu(g.float()).half().float() * u.float()).half()
    got, want = w4a16_matmul(gate_up[:rows], w16, tiles, gated=True), w4a16_matmul(act, w16, tiles)
    assert rel(got.float(), want.float()) < 1e-3, (rows, tiles, rel(got.float(), want.float()))
try:
    w4a16_matmul(gate_up[:1, :256], w16, gated=True)
    raise SystemExit("a gated input of K features was accepted")
except ValueError as e:
    assert "gated" in str(e)
print("max rel err", max(errs))
"""


ROOT = Path(__file__).parents[1]
# Interpreted runs in a subprocess: (arguments, what the output must show)
INTERPRETED = {
    "kernel": (["-c", f"TESTS = {str(ROOT / 'tests')!r}\n" + KERNEL], "max rel err"),
    # scripts/kernel_bench.py w4a16 on tiny shapes: the harness the GPU run uses
    "bench": ([str(ROOT / "scripts" / "kernel_bench.py"), "w4a16", "--cpu-smoke"], "ALL OK"),
}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
@pytest.mark.parametrize("run", list(INTERPRETED))
def test_interpreted(run):
    args, shows = INTERPRETED[run]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and shows in proc.stdout and "FAILURES" not in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_kernel_compiles_for_sm90():
    """The interpreter accepts code the compiler rejects: each tier (and both unpacking paths, with and
    without zero points) compiles for the H100 in bf16."""
    from test_triton_compile import _compile

    from tandem.kernels import w4a16

    io = {"*": "*bf16", "q_ptr": "*i32", "z_ptr": "*u8", "parts_ptr": "*fp32", "counters_ptr": "*i32"}
    for bm, bn, bk, once, zeros in ((16, 64, 128, True, True), (16, 64, 128, False, False), (64, 128, 64, True, True),
                                    (128, 128, 64, True, False)):
        _compile(w4a16._w4a16_kernel, io, dict(GROUP=128, HAS_ZEROS=zeros, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                               PRECISION="tf32", LOAD_ONCE=once, PDL=zeros))
    for bn, bk, zeros in ((128, 128, True), (64, 128, False)):  # the one-row kernel
        _compile(w4a16._w4a16_gemv_kernel, io, dict(GROUP=128, HAS_ZEROS=zeros, BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk,
                                                    PDL=zeros, GATED=not zeros))
