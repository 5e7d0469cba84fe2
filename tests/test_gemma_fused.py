"""Gemma's fused kernels (issue 28, ``tandem.kernels.gemma_fused``) under Triton's interpreter
(TRITON_INTERPRET must be set before Triton is imported: a subprocess), against the torch layers they
replace, at gemma3-1b's widths (hidden 1152, heads of 256, intermediate 6912) with odd row counts; and
the tiny Gemma 3 through the engine with the kernels forced on, token for token equal to the torch path.

What can be exact and what cannot, in float32:
- a norm whose row sum of squares is exact in any order (small integers) and whose width is a power
  of two (the mean's 1/n exact) does the same float32 operations as the reference: equal bit for bit;
- otherwise the kernel sums the squares in another order and multiplies by 1/n where torch's CPU mean
  divides: the row's one scale factor moves by a few float32 ulps (a sum of n positive terms is off
  by at most about sqrt(n) ulps in practice), so each element within 1e-6 relative;
- GELU-tanh: the kernel's tanh comes from exp, torch's CPU from its own vectorised tanh; 1 + tanh
  cancels for very negative gates, so the error is a few ulps of 0.5 * |gate| (not of the result),
  times |up|.
In bfloat16 the interpreter truncates float32 -> bf16 where the GPU (and torch) round to nearest
(measured: 31 193 of 65 536 random products differ), so an interpreted bf16 output may sit a step or
two (one per rounding point) below the reference: checked within 3 bf16 steps, which still catches a
missing rounding point or a wrong input; the GPU check (``benchmarks/gpu_checks.py gemma``) measures
bf16 exactness on the device."""
from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

from test_triton_varlen import _run_interpreted  # noqa: E402 (a subprocess under TRITON_INTERPRET=1)

_KERNELS = r"""
import torch
from tandem.kernels import gemma_fused as k
from tandem.model.layers import mlp, norms
from tandem.model.models.gemma import norm_add_norm

EPS = 1e-6
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7}  # the spacing of values in [1, 2)
# allowed error in ulps (float32: order of operations; bf16: also the interpreter's truncations)
UNITS = {torch.float32: dict(norm=8, stream=4, row=4, gelu=8), torch.bfloat16: dict(norm=2, stream=2, row=2, gelu=8)}

def factor(n):
    return norms.gemma_norm_factor(0.3 * torch.randn(n))

def within(name, out, ref, scale, dtype):  # |out - ref| <= UNITS ulps of scale, element by element
    assert out.dtype == ref.dtype and out.shape == ref.shape, (name, out.dtype, out.shape, ref.shape)
    err = (out.double() - ref.double()).abs()
    bound = UNITS[dtype][name] * ULP[dtype] * scale.double()
    assert (err <= bound).all(), (name, dtype, (err / scale.double()).max().item() / ULP[dtype])

def qkv_views(t, dtype, integers=False):
    # q, k as strided views of one projection, as the model splits it: 4 q heads, 1 kv head, D 256
    qkv = torch.randint(-8, 9, (t, 6 * 256)).to(dtype) if integers else torch.randn(t, 6 * 256).to(dtype)
    return qkv[:, :1024].view(t, 4, 256), qkv[:, 1024:1280].view(t, 1, 256)

def check(dtype):
    torch.manual_seed({torch.float32: 0, torch.bfloat16: 1}[dtype])
    for t in (1, 7, 33):
        q, kk = qkv_views(t, dtype)
        x, res = torch.randn(t, 1152).to(dtype), (3 * torch.randn(t, 1152)).to(dtype)
        for a, f in ((q, factor(256)), (kk, factor(256)), (x, factor(1152))):
            ref = norms.gemma_rms_norm(a, f, EPS)
            within("norm", k.gemma_rms_norm(a, f, EPS), ref, ref.abs(), dtype)
        f1, f2 = factor(1152), factor(1152)
        (out, stream), (ref, ref_stream) = k.norm_add_norm(x, res, f1, f2, EPS), norm_add_norm(x, res, f1, f2, EPS)
        # the normed x's error lands on the sum; the stream's errors spread over its norm's row
        within("stream", stream, ref_stream, ref_stream.abs() + norms.gemma_rms_norm(x, f1, EPS).abs(), dtype)
        within("row", out, ref, ref.abs().amax(1, keepdim=True), dtype)
        gu = torch.randn(t, 2 * 6912).to(dtype) * 3
        gate, up = gu.chunk(2, dim=-1)
        # the reference's 1 + tanh cancels for negative gates: its error scales with 0.5 |gate|
        within("gelu", k.gelu_tanh_mul(gu), mlp.gelu_tanh_mul(gu), 0.5 * gate.abs() * up.abs(), dtype)

# float32, exact: integer rows (sums of squares exact in any order), D = 256 (1/256 exact), any strides
for t in (1, 5, 33):
    q, kk = qkv_views(t, torch.float32, integers=True)
    for x in (q, kk, q.reshape(t * 4, 256)):
        f = factor(256)
        assert torch.equal(k.gemma_rms_norm(x, f, EPS), norms.gemma_rms_norm(x, f, EPS))
check(torch.float32)
check(torch.bfloat16)
print("kernels ok")
"""


def test_kernels_match_the_torch_layers():
    assert "kernels ok" in _run_interpreted(_KERNELS)


_MODEL = r"""
import torch
from tandem import LLM, SamplingParams
from tandem.model.models import gemma

calls = {"norm_add_norm": 0}
init = gemma.GemmaModel.__init__
count = gemma.norm_add_norm

def forced(self, *args, **kwargs):  # the CPU model with the CUDA path's kernels, interpreted
    init(self, *args, **kwargs)
    if FORCE:
        self.fused = True
        kernel = self._norm_add_norm
        def counted(*a):
            calls["norm_add_norm"] += 1
            return kernel(*a)
        self._norm_add_norm = counted

gemma.GemmaModel.__init__ = forced
torch.manual_seed(0)
prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 11, 26)]
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
runs = {}
for FORCE in (False, True):
    llm = LLM("random:tiny-gemma3", device="cpu", dtype="float32", max_num_seqs=4, kv_cache_tokens=512)
    assert llm.engine is not None
    runs[FORCE] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.shutdown()
assert calls["norm_add_norm"] > 0, "the fused path never ran"
for torch_out, fused_out in zip(runs[False], runs[True]):
    assert fused_out.token_ids == torch_out.token_ids, (fused_out.token_ids, torch_out.token_ids)
    for a, b in zip(torch_out.logprobs, fused_out.logprobs):
        for tok in a:
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4, (a[tok], b[tok])
print("model ok", calls)
"""


def test_tiny_gemma3_with_the_kernels_decodes_the_torch_paths_tokens():
    assert "model ok" in _run_interpreted(_MODEL)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernels_compile_for_the_h100(dtype):
    """The interpreter runs kernels as Python; the compiler (sm_90, no GPU needed) sees what it
    would reject, with the fp-fusion options the launches pass."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tandem.kernels import gemma_fused as k

    def build(fn, constexprs, floats, fp_fusion):
        signature = {name: ("constexpr" if name in constexprs else "*fp32" if name.startswith("f_") else
                            f"*{dtype}" if name.endswith("_ptr") else "fp32" if name in floats else "i32")
                     for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": fp_fusion})
        assert "cubin" in compiled.asm

    norm_floats = {"inv_n", "eps"}
    build(k._rms_norm_kernel, dict(HEADS=4, BLOCK=256), norm_floats, False)
    build(k._rms_norm_kernel, dict(HEADS=1, BLOCK=2048), norm_floats, False)
    build(k._norm_add_norm_kernel, dict(BLOCK=2048), norm_floats, False)
    build(k._gelu_tanh_mul_kernel, dict(BLOCK=1024), set(), True)
