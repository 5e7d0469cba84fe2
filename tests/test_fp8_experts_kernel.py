"""FP8 experts (issue 25): the fused MoE kernel reading FP8 weight tiles and dequantizing them in
registers, against ``experts_reference`` on the dequantized weights; the reference itself on FP8
experts; and ``Fp8Experts``' joins. The kernel runs in a subprocess under Triton's interpreter
(TRITON_INTERPRET=1 must be set before Triton is imported), float32, tiny shapes, as
tests/test_fused_moe.py does."""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from tandem.model.layers.experts import experts_reference, route
from tandem.model.quant.fp8 import Fp8Weight
from tandem.model.quant.expert_weights import cat_expert_rows
from tandem.model.quant.fp8_experts import Fp8Experts

def quantized(dense: torch.Tensor, form: str, block: tuple[int, int] | None = None) -> tuple[Fp8Experts, torch.Tensor]:
    """(FP8 experts in one of the three scale forms, the dequantized float32 weights they stand for),
    quantized independently of tandem: amax / 448 over the expert's tensor, row or block."""
    e, n, k = dense.shape
    if form == "tensor":  # one scale per expert, expanded to its rows as the loader stores it
        per_row = dense.abs().amax(dim=(1, 2), keepdim=True).expand(e, n, 1) / 448.0
        grid, block = per_row.contiguous(), (1, k)
    elif form == "channel":
        grid, block = dense.abs().amax(dim=2, keepdim=True) / 448.0, (1, k)
    else:
        bn, bk = block
        grid = torch.empty(e, -(-n // bn), -(-k // bk))
        for r in range(grid.shape[1]):
            for c in range(grid.shape[2]):
                grid[:, r, c] = dense[:, r * bn:(r + 1) * bn, c * bk:(c + 1) * bk].abs().amax(dim=(1, 2)) / 448.0
    full = grid.repeat_interleave(block[0], 1)[:, :n].repeat_interleave(block[1], 2)[:, :, :k]
    q = (dense / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    return Fp8Experts(q, grid.float(), block), q.float() * full


# the interpreted script defines the same helper
HELPERS = "import torch\nfrom tandem.model.quant.fp8_experts import Fp8Experts\n" + inspect.getsource(quantized)

KERNEL = HELPERS + r"""
import random
from moe_cases import check_quantized_case
from tandem.kernels.fused_moe import fused_experts
from tandem.kernels.moe_align import DECODE_BLOCKS, MEDIUM_BLOCKS
from tandem.model.layers.experts import experts, experts_reference, route

rng, errs = random.Random(0), []
# (32, 64) with MEDIUM_BLOCKS (block_k 64): the down GEMM's K (128) spans two grid columns, one per tile
CASES = [("tensor", None), ("channel", None), ("block", (16, 16)), ("block", (8, 32)), ("block", (128, 128)),
         ("block", (32, 64))]
for case, (form, block) in enumerate(CASES * 2):
    g = torch.Generator().manual_seed(case)
    n_exp, k = rng.choice([4, 8]), (1 if case % 2 == 0 else rng.randint(2, 3))
    tokens, hidden = rng.choice([1, 5, 23]), rng.choice([40, 48])  # 40: a partial last column block
    inter = 32 if block is None or max(block) <= 32 else 128  # the up rows start on a block row
    x = torch.randn(tokens, hidden, generator=g)
    w13, w13_f = quantized(torch.randn(n_exp, 2 * inter, hidden, generator=g) / hidden ** 0.5, form, block)
    w2, w2_f = quantized(torch.randn(n_exp, hidden, inter, generator=g) / inter ** 0.5, form, block)
    w, ids = route(torch.randn(tokens, n_exp, generator=g) * 3, k, True)
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.3, n_exp, ids).int()  # dropped routes (id E)
    ids[0, 0] = n_exp
    blocks = [None, DECODE_BLOCKS, MEDIUM_BLOCKS][case % 3]
    out = fused_experts(x, w13, w2, w, ids, "silu", blocks)
    dense = fused_experts(x, w13_f, w2_f, w, ids, "silu", blocks)
    ref = experts_reference(x, w13_f, w2_f, w, ids)
    what = (form, block, tokens, n_exp, k, hidden, inter)
    errs.append(check_quantized_case(out, dense, ref, experts_reference(x, w13, w2, w, ids), what, k))

# a wrong scale read would show: scales of one expert swapped change the output of its tokens only
g = torch.Generator().manual_seed(99)
x = torch.randn(6, 48, generator=g)
w13, _ = quantized(torch.randn(4, 32, 48, generator=g), "block", (16, 16))
w2, _ = quantized(torch.randn(4, 48, 16, generator=g), "block", (16, 16))
ids = torch.tensor([[0], [1], [2], [3], [0], [1]], dtype=torch.int32)
w = torch.ones(6, 1)
base = fused_experts(x, w13, w2, w, ids)
w13.scale[2, 1] *= 2.0  # the up rows' scales of expert 2
moved = fused_experts(x, w13, w2, w, ids)
assert not torch.equal(moved[2], base[2]) and torch.equal(moved[[0, 1, 3, 4, 5]], base[[0, 1, 3, 4, 5]])

# the models' entry point takes FP8 experts under TANDEM_MOE=triton
import os
os.environ["TANDEM_MOE"] = "triton"
assert torch.equal(experts(x, w13, w2, w, ids), moved)
print("max rel err", max(errs))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_the_kernel_on_fp8_experts_equals_the_reference():
    from test_triton_varlen import _run_interpreted

    assert "max rel err" in _run_interpreted(KERNEL)


def test_the_reference_dequantizes_each_expert_as_it_reads_it():
    g = torch.Generator().manual_seed(3)
    w13, w13_f = quantized(torch.randn(6, 64, 40, generator=g), "block", (16, 16))
    w2, w2_f = quantized(torch.randn(6, 40, 32, generator=g), "channel")
    x = torch.randn(9, 40, generator=g).to(torch.bfloat16)
    w, ids = route(torch.randn(9, 6, generator=g), 2, True)
    ids[1, 1] = 6  # dropped
    ref = experts_reference(x, w13_f.to(torch.bfloat16), w2_f.to(torch.bfloat16), w, ids)
    assert torch.equal(experts_reference(x, w13, w2, w, ids), ref) and ref.dtype == torch.bfloat16
    assert torch.equal(w13.dequantize(torch.float32), w13_f)


def test_fp8_experts_join_as_the_loader_builds_them():
    """Per-expert projections (``Fp8Weight``) stacked and joined (gate, up) keep their values; rows
    that do not end on a scale block cannot be joined, and the error names the weight."""
    g = torch.Generator().manual_seed(5)
    gate, up = (Fp8Weight(torch.randn(32, 48, generator=g).to(torch.float8_e4m3fn), torch.rand(2, 3, generator=g),
                          (16, 16)) for _ in range(2))
    joined = cat_expert_rows([Fp8Experts.of(gate), Fp8Experts.of(up)], "layer 3 w13")
    stacked = Fp8Experts.stack([joined, joined])
    want = torch.cat([gate.dequantize(torch.float32), up.dequantize(torch.float32)])
    assert stacked.shape == (2, 64, 48) and torch.equal(stacked.expert(1, torch.float32), want)
    row = Fp8Weight(gate.weight, torch.rand(32, generator=g))  # per-channel: any row count joins
    assert torch.equal(Fp8Experts.of(row).expert(0, torch.float32), row.dequantize(torch.float32))
    ragged = Fp8Weight(gate.weight[:24], gate.scale, (16, 16))
    with pytest.raises(ValueError, match=r"layer 3 w13: .*\[1, 24, 48\].*whole 16-row blocks"):
        cat_expert_rows([Fp8Experts.of(ragged), Fp8Experts.of(up)], "layer 3 w13")
    assert Fp8Experts.quantize(want[None]).nbytes == 64 * 48 + 64 * 4


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
@pytest.mark.parametrize("fp8", [False, True])
def test_the_grouped_gemm_compiles_for_h100(fp8):
    """The interpreter accepts what the compiler may not (an FP8 load's fill, the widening): both
    GEMMs' variants compile for sm_90 in bf16, with dense and FP8 weights."""
    import test_triton_compile
    from tandem.kernels.fused_moe import _grouped_gemm_kernel

    pointers = {"a_ptr": "*bf16", "b_ptr": "*fp8e4nv" if fp8 else "*bf16", "c_ptr": "*bf16", "weights_ptr": "*fp32",
                "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_padded_ptr": "*i32",
                "s_ptr": "*fp32" if fp8 else "*bf16"}
    for gated, scale_row in ((True, False), (False, True), (True, True)):
        test_triton_compile._compile(_grouped_gemm_kernel, pointers, dict(
            GATED=gated, ACT=0, MUL_WEIGHT=not gated, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8,
            PRECISION="tf32", W_KIND=int(fp8), SCALE_ROW=scale_row, HAS_ZEROS=False))
