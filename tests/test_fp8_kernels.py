"""The FP8 kernels (issue 25) under Triton's interpreter (TRITON_INTERPRET must be set before Triton
is imported: a subprocess), float32 math: the activation quantization bit-identical to the torch ops
it replaces, the GEMM (row-wise and block-wise scales, split-K) equal to the float32 arithmetic of the
same FP8 values, the engine on a block-wise checkpoint through the CUDA path; and both kernels
compile for the H100 (sm_90, FP8 dot)."""
from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

from test_triton_varlen import _run_interpreted  # noqa: E402 (a subprocess under TRITON_INTERPRET=1)

_KERNEL = r"""
import torch
from tandem.kernels.fp8_gemm import fp8_block_gemm
from tandem.kernels.fp8_quant import fp8_quant
from tandem.model.quant.fp8 import Fp8Weight, quantize_activations, reference_linear

g = torch.Generator().manual_seed(0)
wide = torch.randn(3, 5000, generator=g)  # several column blocks per row
x = torch.randn(6, 320, generator=g) * torch.tensor([1.0, 100.0, 1e-3, 0.0, 5.0, 1.0])[:, None]
x[4, 7] = 2e4  # far above the clamp
strided = torch.randn(4, 400, generator=g)[:, 40:340]  # rows not adjacent
for t in (wide, x, strided):
    for static, ub, group in ((None, None, None), (None, 3.0, None), (torch.tensor([0.01]), None, None),
                              (None, None, 32), (None, None, 48)):  # 48: a partial last group
        if t is wide and group is not None:
            continue  # a group is one column block: x and strided take those, the wide rows add nothing
        q, scale = fp8_quant(t, static, ub, group)
        ref_q, ref_scale = quantize_activations(t, static, ub, group)  # the torch ops (a CPU tensor)
        assert torch.equal(scale, ref_scale), (static, ub, group)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)), (static, ub, group)

# the block GEMM against the float32 arithmetic, ragged edges in every dimension
# (1, k): row-wise weights, as fp8_linear runs them at decode sizes on CUDA
for m, n, k, block in ((1, 96, 64, (32, 32)), (21, 80, 100, (16, 32)), (70, 136, 96, (32, 16)), (40, 48, 96, (1, 96))):
    w = torch.randn(n, k, generator=g) * 0.05
    grid = (-(-n // block[0]), -(-k // block[1]))
    scale = torch.rand(grid, generator=g) * 1e-3 + 1e-4
    weight = Fp8Weight((w / scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k])
                       .clamp(-448, 448).to(torch.float8_e4m3fn), scale, block)
    a = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    aq, a_scale = quantize_activations(a, None, None, block[1])
    ref = reference_linear(a, weight, bias)
    for split in (None, 1, 3):  # None: from the shapes (num_sms is 8 on a CPU: it splits)
        out = fp8_block_gemm(aq, a_scale, weight.weight, weight.scale, block, torch.float32, bias, split)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (m, n, k, block, split, err)

# the weight-only GEMM (decode sizes): x in its own precision times the dequantized FP8 weight
from tandem.kernels.w8a16 import W8Tiles, w8a16_matmul
for m, n, k, block, tiles in ((1, 96, 64, None, None), (5, 80, 128, (16, 32), None), (33, 136, 96, (32, 32), None),
                              (64, 48, 160, None, W8Tiles(32, 32, 3, 4, 2)), (2, 72, 256, (8, 64), W8Tiles(16, 64, 2, 4, 2)),
                              (3, 80, 192, None, W8Tiles(32, 64, 2, 4, 2, swap=True)),
                              (20, 72, 256, (8, 64), W8Tiles(64, 32, 3, 4, 2, swap=True))):
    w = torch.randn(n, k, generator=g) * 0.05
    scale = (torch.rand(n, generator=g) if block is None else
             torch.rand((-(-n // block[0]), -(-k // block[1])), generator=g)) * 1e-3 + 1e-4
    full = scale[:, None].expand(n, k) if block is None else scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    weight = Fp8Weight((w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale, block)
    a = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = a @ weight.dequantize(torch.float32).t() + bias
    out = w8a16_matmul(a, weight.weight, weight.scale, block, bias, tiles)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, (m, n, k, block, tiles, err)
print("fp8 kernels ok")
"""


_BLOCK_ENGINE = r"""
import tempfile
from pathlib import Path

import tandem.model.quant.reader as reader
from checkpoints import build_checkpoint
from fp8_checkpoints import fp8_checkpoint
from tandem import LLM, SamplingParams
from tandem.model.quant.fp8 import Fp8Weight, reference_linear

reader.native_fp8 = lambda device, dtype: True  # the CUDA path: activations per group, the block GEMM
tmp = Path(tempfile.mkdtemp())
fp8, _ = fp8_checkpoint(build_checkpoint("llama", tmp / "src"), tmp / "fp8", "fp8-block")
llm = LLM(str(fp8), device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256)
layer = llm.engine.worker.model.weights.layers[1]
assert isinstance(layer.qkv, Fp8Weight) and layer.gate_up.block == (16, 16)
prompts, greedy = [[5, 9, 200, 31, 7, 88, 120], [300, 2, 2, 8]], SamplingParams(temperature=0, max_tokens=3)
out = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
Fp8Weight.forward = lambda self, x, bias=None: reference_linear(x, self, bias)
assert out == [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
print("fp8 block engine ok")
"""


def test_the_fp8_kernels_equal_their_references():
    assert "fp8 kernels ok" in _run_interpreted(_KERNEL)


def test_the_engine_on_the_block_fp8_gemm():
    """A block-wise checkpoint through the CUDA path (interpreted): the same tokens as the model
    computing each FP8 linear in float32."""
    assert "fp8 block engine ok" in _run_interpreted(_BLOCK_ENGINE)


def test_the_fp8_kernels_compile_for_h100(monkeypatch):
    import test_triton_compile
    from tandem.kernels.fp8_gemm import _fp8_block_gemm_kernel
    from tandem.kernels.fp8_quant import _fp8_quant_kernel

    monkeypatch.setattr(test_triton_compile, "FLOATS", test_triton_compile.FLOATS | {"scale_ub"})
    for static in (False, True):
        for has_ub in (False, True):
            test_triton_compile._compile(_fp8_quant_kernel, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv"},
                                         dict(STATIC=static, HAS_UB=has_ub, BLOCK=2048))
    for block_m, block_n in ((16, 32), (32, 32), (64, 32), (64, 128)):  # fp8_block_gemm's tiles
        for bias in (False, True):
            test_triton_compile._compile(
                _fp8_block_gemm_kernel, {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "bias_ptr": "*bf16",
                                         "parts_ptr": "*fp32", "counters_ptr": "*i32"},
                dict(HAS_BIAS=bias, FP8_DOT=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128))
    from tandem.kernels.w8a16 import _w8a16_kernel

    for rowwise, bias, swap in ((True, False, False), (False, True, False), (True, False, True), (False, True, True)):
        test_triton_compile._compile(  # weight-only FP8 at decode sizes, split K
            _w8a16_kernel, {"a_ptr": "*bf16", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "bias_ptr": "*bf16",
                            "parts_ptr": "*fp32", "counters_ptr": "*i32"},
            dict(ROWWISE=rowwise, HAS_BIAS=bias, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, PRECISION="tf32", SWAP=swap, PDL=swap))
