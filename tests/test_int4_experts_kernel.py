"""4-bit experts: the fused MoE kernel reading packed 4-bit tiles (``kernels/moe_weights``) and
dequantizing them in registers, bit for bit the kernel on the dequantized weights and equal to
``experts_reference``; the reference on ``Int4Experts``; the joins the loader makes. The kernel runs
in a subprocess under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is
imported), float32, tiny shapes, as tests/test_fp8_experts_kernel.py does. The experts are packed
here, independently of tandem's packers: nibble i of word r holds input channel 8r + i."""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from tandem.model.layers.experts import experts_reference, route
from tandem.model.quant import int4
from tandem.model.quant.expert_weights import cat_expert_rows, stack_experts
from tandem.model.quant.int4_experts import Int4Experts


def random_int4(e: int, n: int, k: int, group: int, symmetric: bool, seed: int) -> tuple[Int4Experts, torch.Tensor]:
    """(4-bit experts [E, N, K] of random nibbles, zero points (8 when symmetric) and group scales,
    the float32 weights they stand for: (q - zero) * scale)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (e, k, n), generator=g)
    zeros = torch.full((e, k // group, n), 8) if symmetric else torch.randint(0, 16, (e, k // group, n), generator=g)
    scales = torch.rand(e, k // group, n, generator=g) * 0.02 + 0.002
    words = (q.view(e, k // 8, 8, n) << (4 * torch.arange(8)).view(1, 1, 8, 1)).sum(2)  # [0, 2**32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    dense = (q - zeros.repeat_interleave(group, 1)).float() * scales.repeat_interleave(group, 1)
    packed = Int4Experts(words.contiguous(), scales, None if symmetric else zeros.to(torch.uint8), group)
    return packed, dense.transpose(1, 2).contiguous()


# the interpreted script defines the same helper
HELPERS = "import torch\nfrom tandem.model.quant.int4_experts import Int4Experts\n" + inspect.getsource(random_int4)

KERNEL = HELPERS + r"""
import dataclasses, os, random
from moe_cases import check_quantized_case
from tandem.kernels.fused_moe import fused_experts
from tandem.kernels.moe_align import DECODE_BLOCKS, MEDIUM_BLOCKS, moe_blocks
from tandem.model.layers.experts import experts, experts_reference, route

rng, errs = random.Random(0), []
# (group, symmetric): block_k 128 / 64 halves to 16 or 32 inside a group; 64 x 64: two K tiles per group
CASES = [(32, True), (32, False), (16, False), (64, True), (64, False), (16, True)]
for case, (group, sym) in enumerate(CASES):
    g = torch.Generator().manual_seed(case)
    n_exp, k = rng.choice([4, 8]), (1 if case % 2 == 0 else rng.randint(2, 3))
    tokens, hidden, inter = rng.choice([1, 5, 23]), 64, rng.choice([32, 64]) if group < 64 else 64
    x = torch.randn(tokens, hidden, generator=g)
    w13, w13_f = random_int4(n_exp, 2 * inter, hidden, group, sym, 2 * case)
    w2, w2_f = random_int4(n_exp, hidden, inter, group, sym, 2 * case + 1)
    w, ids = route(torch.randn(tokens, n_exp, generator=g) * 3, k, True)
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, n_exp, ids).int()  # dropped routes (id E)
    ids[0, 0] = n_exp
    blocks = [None, DECODE_BLOCKS, MEDIUM_BLOCKS][case % 3]
    out = fused_experts(x, w13, w2, w, ids, "silu", blocks)
    # the same tiles on the dense weights: K tiles halved as the 4-bit GEMMs halve them, to lie in a group
    same = blocks or moe_blocks(tokens, k, n_exp)
    same = dataclasses.replace(same, block_k=min(same.block_k, group & -group))
    dense = fused_experts(x, w13_f, w2_f, w, ids, "silu", same)
    ref = experts_reference(x, w13_f, w2_f, w, ids)
    what = (group, sym, tokens, n_exp, k, inter)
    errs.append(check_quantized_case(out, dense, ref, experts_reference(x, w13, w2, w, ids), what, k))

# a wrong zero point or group scale would show: expert 2's second group changed changes its tokens only
g = torch.Generator().manual_seed(99)
x = torch.randn(6, 64, generator=g)
w13, _ = random_int4(4, 64, 64, 32, False, 7)
w2, _ = random_int4(4, 64, 32, 32, True, 8)
ids = torch.tensor([[0], [1], [2], [3], [0], [1]], dtype=torch.int32)
w = torch.ones(6, 1)
base = fused_experts(x, w13, w2, w, ids)
others = [0, 1, 3, 4, 5]
w13.zeros[2, 1, 40] ^= 1  # one up row's zero point, second group
moved = fused_experts(x, w13, w2, w, ids)
assert not torch.equal(moved[2], base[2]) and torch.equal(moved[others], base[others]), "zero point"
w2.scales[2, 0, 5] *= 1.5  # one output row's scale of w2 (symmetric: no zero points stored)
scaled = fused_experts(x, w13, w2, w, ids)
assert not torch.equal(scaled[2], moved[2]) and torch.equal(scaled[others], base[others]), "scale"
w13.scales[1, 1, 3] *= 2.0  # a gate row's scale, second group
assert not torch.equal(fused_experts(x, w13, w2, w, ids)[[1, 5]], scaled[[1, 5]]), "second group's scale"

# the models' entry point takes 4-bit experts under TANDEM_MOE=triton
os.environ["TANDEM_MOE"] = "triton"
assert torch.equal(experts(x, w13, w2, w, ids), fused_experts(x, w13, w2, w, ids))
print("max rel err", max(errs))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_the_kernel_on_int4_experts_equals_the_dequantized_kernel_and_the_reference():
    from test_triton_varlen import _run_interpreted

    assert "max rel err" in _run_interpreted(KERNEL)


def test_the_reference_dequantizes_each_expert_as_loading_does():
    """The reference reads each routed expert through ``Int4Experts.expert``, which is
    ``int4.dequantize`` of that expert: the weights of a model dequantized at load."""
    w13, w13_f = random_int4(6, 64, 32, 32, False, 1)
    w2, w2_f = random_int4(6, 32, 32, 16, True, 2)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    w, ids = route(torch.randn(9, 6, generator=torch.Generator().manual_seed(4)), 2, True)
    ids[1, 1] = 6  # dropped
    b13, b2 = _in_dtype(w13, torch.bfloat16), _in_dtype(w2, torch.bfloat16)  # scales in the model dtype
    ref = experts_reference(x, b13.dequantize(torch.bfloat16), b2.dequantize(torch.bfloat16), w, ids)
    assert torch.equal(experts_reference(x, b13, b2, w, ids), ref) and ref.dtype == torch.bfloat16
    assert torch.equal(w13.dequantize(torch.float32), w13_f) and torch.equal(w2.dequantize(torch.float32), w2_f)
    for e in range(6):
        assert torch.equal(b13.expert(e, torch.bfloat16), int4.dequantize(b13.weight(e)))


def _in_dtype(w: Int4Experts, dtype: torch.dtype) -> Int4Experts:
    return Int4Experts(w.qweight, w.scales.to(dtype), w.zeros, w.group_size)


def test_int4_experts_join_stack_and_quantize_as_the_loader_builds_them():
    """Per-expert projections (``Int4Weight``) joined (gate, up: one symmetric, one not) and stacked
    keep their values; act order, mixed kinds and unequal groups are refused naming the weight;
    ``quantize`` is the linear layers' round to nearest; ``nbytes`` counts words, scales, zeros."""
    gate, gate_f = random_int4(1, 16, 64, 32, True, 5)
    up, up_f = random_int4(1, 24, 64, 32, False, 6)
    joined = cat_expert_rows([Int4Experts.of(gate.weight(0)), Int4Experts.of(up.weight(0))], "layer 3 w13")
    stacked = stack_experts([joined, joined])
    assert stacked.shape == (2, 40, 64) and stacked.zeros[:, :, :16].eq(8).all()
    assert torch.equal(stacked.expert(1, torch.float32), torch.cat([gate_f[0], up_f[0]]))
    assert stacked.nbytes == 2 * (40 * 64 // 2 + 2 * 40 * 4 + 2 * 40)
    assert joined.zeros is not None and stack_experts([gate, gate]).zeros is None  # symmetric: no bytes
    with pytest.raises(ValueError, match="act-order"):
        Int4Experts.of(int4.Int4Weight(gate.qweight[0], gate.scales[0], None, 32, torch.arange(64).flip(0)))
    other, _ = random_int4(1, 16, 64, 16, True, 7)
    with pytest.raises(ValueError, match=r"layer 3 w13: 4-bit expert weights .* groups of \[32, 16\]"):
        cat_expert_rows([gate, other], "layer 3 w13")
    with pytest.raises(ValueError, match=r"layer 3 w13: .*\['Int4Experts', 'Tensor'\]"):
        cat_expert_rows([gate, gate_f], "layer 3 w13")
    dense = torch.randn(3, 48, 256, generator=torch.Generator().manual_seed(8))
    q = Int4Experts.quantize(dense)
    assert q.group_size == 128 and q.zeros is None
    assert torch.equal(q.expert(2, torch.float32), int4.dequantize(int4.quantize_rtn(dense[2], 128)))
    assert q.nbytes == 3 * (48 * 256 // 2 + 2 * 48 * 4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_the_grouped_gemm_compiles_for_h100_with_int4_weights():
    """The interpreter accepts what the compiler may not (the nibbles' reshape, a uint8 zero point):
    both GEMMs' 4-bit variants compile for sm_90 in bf16."""
    import test_triton_compile
    from tandem.kernels.fused_moe import _grouped_gemm_kernel

    pointers = {"a_ptr": "*bf16", "b_ptr": "*i32", "c_ptr": "*bf16", "weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8"}
    for gated, zeros in ((True, False), (False, True)):
        test_triton_compile._compile(_grouped_gemm_kernel, pointers, dict(
            GATED=gated, ACT=0, MUL_WEIGHT=not gated, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8,
            PRECISION="tf32", W_KIND=2, SCALE_ROW=True, HAS_ZEROS=zeros))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_the_gpu_checks_int4_experts_run_on_the_tiny_shape():
    """benchmarks/moe_bench.py's ``_int4_check`` (run on the GPU by ``check``) runs under the
    interpreter on its TINY shape and passes. Its timings are stubbed: they assert nothing, would
    time the interpreter, and re-run calls the check has made (the CPU timer runs in
    test_fused_moe.py's ``kernel_bench.py moe --cpu-smoke``)."""
    from pathlib import Path

    from test_triton_varlen import _run_interpreted

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    script = f"""
import sys
sys.path.insert(0, {str(benchmarks)!r})
import moe_bench as bench
bench.time_us = lambda fn, device: 1.0
from tandem.kernels.fused_moe import fused_experts
from tandem.model.layers.experts import experts_reference
assert bench._int4_check(fused_experts, experts_reference, bench.TINY, "cpu")
print("int4 check ok")
"""
    assert "int4 check ok" in _run_interpreted(script)
