"""The one-row GEMV of 16-bit weights (``kernels/gemv.py``) under Triton's interpreter, float32 math:
equal to x @ W^T (+ bias) in float32 for ragged shapes, every split count and tile, with fresh random
inputs; the default tiles split K to fill the SMs; the kernel compiles for the H100 (sm_90) in bf16;
and ``linear`` sends only one 16-bit row on a CUDA device to it, and only when asked."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

from test_triton_varlen import _run_interpreted  # noqa: E402 (a subprocess under TRITON_INTERPRET=1)

_KERNEL = r"""
import torch
from tandem.kernels.gemv import GemvTiles, gemv, gemv_tiles

g = torch.Generator().manual_seed(1234)
worst = 0.0
cases = [(48, 200, None), (64, 256, GemvTiles(16, 64, 4, 4)), (40, 1000, GemvTiles(16, 128, 3, 4)),
         (8, 64, None), (100, 640, GemvTiles(32, 64, 16, 4)), (17, 96, GemvTiles(8, 256, 2, 4))]
for n, k, tiles in cases:
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(1, k, generator=g)
    bias = torch.randn(n, generator=g)
    for b in (None, bias):
        for _ in range(2):  # twice: the split counters are left ready for the next launch
            y = gemv(x, w, b, tiles)
        ref = x.double() @ w.double().t() + (0 if b is None else b.double())
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert y.shape == (1, n) and y.dtype == torch.float32, (y.shape, y.dtype)
        assert err < 1e-5, (n, k, tiles, err)
        worst = max(worst, err)
w, x = torch.randn(72, 128, generator=g), torch.randn(1, 128, generator=g)
out = torch.full((1, 72), float("nan"))
assert gemv(x, w, out=out) is out and torch.allclose(out, x @ w.t(), rtol=1e-5, atol=1e-5)
for bad in (torch.randn(2, 64), torch.randn(1, 63)):
    try:
        gemv(bad, torch.randn(8, 64))
    except ValueError as exc:
        assert "gemv" in str(exc)
    else:
        raise AssertionError("a wrong x was accepted")
print(f"gemv ok, max rel err {worst:.2e}")
"""


def test_the_gemv_equals_the_float32_product():
    assert "gemv ok" in _run_interpreted(_KERNEL)


def test_the_default_tiles_follow_the_h100_sweep():
    from tandem.kernels.gemv import gemv_tiles

    o_proj = gemv_tiles(4096, 4096, sms=132)  # 512 row tiles: several waves, no split
    assert (o_proj.block_n, o_proj.split_k, o_proj.num_warps) == (8, 1, 8)
    head = gemv_tiles(128256, 4096, sms=132)
    assert (head.block_n, head.block_k, head.split_k) == (16, 512, 1)
    narrow = gemv_tiles(256, 8192, sms=132)  # 32 row tiles: K is split until a wave is full
    assert narrow.split_k == 4  # 8 K tiles: each split keeps two
    assert gemv_tiles(64, 100, sms=132).block_k == 128  # a short K gets a short tile


def test_the_gemv_compiles_for_h100():
    import test_triton_compile
    from tandem.kernels.gemv import _gemv_kernel

    for bias in (False, True):
        test_triton_compile._compile(_gemv_kernel, {"*": "*bf16", "parts_ptr": "*fp32", "counters_ptr": "*i32"},
                                     dict(HAS_BIAS=bias, BLOCK_N=16, BLOCK_K=512, PDL=bias))


def test_linear_takes_the_gemv_only_for_one_16_bit_row_on_a_gpu_when_asked(monkeypatch):
    from tandem.model.quant import linear as lin

    class Cuda(torch.Tensor):  # a CPU tensor that says it is on a GPU: the choice alone is tested
        @property
        def is_cuda(self) -> bool:
            return True

    w = torch.randn(8, 32, dtype=torch.bfloat16)
    row = torch.randn(1, 1, 32, dtype=torch.bfloat16).as_subclass(Cuda)
    monkeypatch.setattr(lin, "_gemv_enabled", lambda: True)
    assert lin.gemv_on(row, w)
    assert not lin.gemv_on(torch.randn(2, 32, dtype=torch.bfloat16).as_subclass(Cuda), w)  # two rows
    assert not lin.gemv_on(torch.randn(1, 32, dtype=torch.bfloat16), w)  # on the CPU
    assert not lin.gemv_on(torch.randn(1, 32).as_subclass(Cuda), w.float())  # float32
    assert not lin.gemv_on(row, w.half())  # dtypes differ
    assert not lin.gemv_on(row, w.t())  # not contiguous
    monkeypatch.setattr(lin, "_gemv_enabled", lambda: False)
    assert not lin.gemv_on(row, w)


def test_a_gemv_switch_other_than_0_or_1_is_refused_naming_it(monkeypatch):
    from tandem.model.quant import linear as lin

    for value, on in (("1", True), ("0", False)):
        monkeypatch.setenv("TANDEM_GEMV", value)
        lin._gemv_enabled.cache_clear()
        assert lin._gemv_enabled() is on
    monkeypatch.setenv("TANDEM_GEMV", "yes")
    lin._gemv_enabled.cache_clear()
    with pytest.raises(ValueError, match="TANDEM_GEMV must be 0 or 1"):
        lin._gemv_enabled()
    monkeypatch.delenv("TANDEM_GEMV")
    lin._gemv_enabled.cache_clear()
    assert lin._gemv_enabled() is False
