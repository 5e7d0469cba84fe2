"""Checks shared by the quantized-experts kernel tests (tests/test_fp8_experts_kernel.py,
tests/test_int4_experts_kernel.py), imported by their interpreted scripts too."""
from __future__ import annotations

import torch


def check_quantized_case(out: torch.Tensor, dense: torch.Tensor, ref: torch.Tensor, ref_quantized: torch.Tensor,
                         what: tuple, k: int) -> float:
    """The fused kernel on quantized experts (``out``) equals it on their dequantized weights
    (``dense``) bit for bit, the reference reading the quantized experts (``ref_quantized``) equals it
    on the dequantized ones (``ref``), and the kernel is within float32 rounding of the reference;
    with k = 1 the first token's (dropped) row is zero. Returns the relative error."""
    assert torch.equal(out, dense), ("in-register dequantization differs from dequantized weights", what)
    assert torch.equal(ref_quantized, ref), ("reference on quantized experts", what)
    assert ref.abs().max() > 0 and not torch.isnan(out).any(), what
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, (what, err)
    if k == 1:
        assert torch.equal(out[0], torch.zeros_like(out[0])), "a dropped token's row is zero"
    return err
