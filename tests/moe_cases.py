"""Checks shared by the quantized-experts kernel tests (tests/test_fp8_experts_kernel.py,
tests/test_int4_experts_kernel.py), imported by their interpreted scripts too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


ENGINE = r"""
import os, sys, torch
import torch.nn.functional as F
from tandem import LLM, SamplingParams

SETUP
prompts = [[5, 17, 42, 99, 3], [200, 7, 7, 64]]
params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
runs = {}
for path, mode in ((sys.argv[1], "triton"), (sys.argv[2], "reference")):
    os.environ["TANDEM_MOE"] = mode
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256)
    if mode == "triton":
        assert isinstance(llm.engine.worker.model.weights.layers[0].experts.w13, EXPERTS)
    runs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.shutdown()
assert runs["triton"] == runs["reference"], runs
print("engine ok")
"""


def kernel_gives_the_dequantized_tokens(setup: str, experts: str, quantized: Path, dense: Path) -> None:
    """In a subprocess under Triton's interpreter, after ``setup`` (code that forces the quantized
    path on the CPU): the quantized checkpoint through the fused kernel (TANDEM_MOE=triton), its
    layer 0 experts of class ``experts`` (a name ``setup`` imports), gives the greedy tokens of the
    dense (dequantized) checkpoint through the reference."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    script = ENGINE.replace("SETUP", setup).replace("EXPERTS", experts)
    proc = subprocess.run([sys.executable, "-c", script, str(quantized), str(dense)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "engine ok" in proc.stdout, proc.stdout + proc.stderr


def check_rank_slices(experts, expert_parallel: bool) -> None:
    """``experts(tp)`` -> (w13, w2) dequantized as rank ``tp.rank`` loads them: each of 2 ranks holds
    half the experts (expert parallel) or half of every expert's width (tensor parallel: the gate and
    up rows, the down columns) of the unsharded model's, exactly."""
    from tandem.model.tp_layout import TPLayout

    w13, w2 = experts(TPLayout())
    e, i = w2.shape[0], w2.shape[2]
    for rank in range(2):
        got13, got2 = experts(TPLayout(rank, 2, expert_parallel))
        if expert_parallel:
            mine = slice(rank * e // 2, (rank + 1) * e // 2)
            want13, want2 = w13[mine], w2[mine]
        else:
            half = slice(rank * i // 2, (rank + 1) * i // 2)
            want13 = torch.cat([w13[:, :i][:, half], w13[:, i:][:, half]], 1)
            want2 = w2[:, :, half]
        assert torch.equal(got13, want13) and torch.equal(got2, want2), (rank, expert_parallel)
