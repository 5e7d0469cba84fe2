"""The sampling stage's Triton kernels (top-k/top-p cutoff, logprob statistics, penalties) against
their torch definitions, on CPU through Triton's interpreter (float32 math, small shapes), and the
engine with them against the engine with the torch definitions. Each check runs in a subprocess so
TRITON_INTERPRET is set before Triton is imported."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (the test extra installs it)")

CUTOFF = r"""
import torch
from tandem.kernels.top_k_top_p import fused_cutoff
from tandem.worker.sampler import top_k_top_p_cutoff

def check(seed, n, vocab):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * (0.3 + 3 * torch.rand(n, 1, generator=g))
    logits[0, 100:110] = logits[0].max() + 1  # tied maxima
    logits[1] = logits[1].round(decimals=1)  # ties everywhere, at the cutoffs too
    logits[2, ::3] = float("-inf")  # banned tokens
    logits[3, ::2] = -0.0  # signed zeros compare equal
    logits[3, 1::2] = 0.0
    temperature = torch.rand(n, generator=g) * 1.5 + 0.2
    top_k = torch.where(torch.rand(n, generator=g) < 0.5, 0, torch.randint(1, 80, (n,), generator=g))
    top_p = torch.rand(n, generator=g).clamp(min=0.02)
    top_p[::4] = 1.0
    top_k[4], top_k[5], top_k[6], top_p[6] = vocab, vocab + 7, 0, 1.0  # top-k keeps all; off entirely
    top_k[7], top_p[7] = 1, 1.0
    temperature[8] = 0.0  # greedy: the sampler ignores its cutoff, the kernel skips it
    want = top_k_top_p_cutoff(logits, temperature, top_k, top_p)
    want[temperature == 0] = float("-inf")
    got = fused_cutoff(logits, temperature, top_k, top_p)
    assert torch.equal(got, want), (seed, (got != want).nonzero().flatten().tolist(), got, want)
    # bf16 logits are read widened: the cutoffs of the widened rows
    half = logits[:6].bfloat16()
    assert torch.equal(fused_cutoff(half, temperature[:6], top_k[:6], top_p[:6]),
                       fused_cutoff(half.float(), temperature[:6], top_k[:6], top_p[:6]))

for seed, vocab in ((0, 520), (1, 256)):  # three blocks, the last one short; exactly one
    check(seed, 12, vocab)
print("cutoff ok")
"""

LOGPROBS = r"""
import torch
from tandem.kernels.logprobs import logprob_stats
from tandem.worker.logprobs import _chunk, token_logprobs

g = torch.Generator().manual_seed(3)
logits = torch.randn(7, 1500, generator=g) * 4
logits[1, ::3] = float("-inf")
logits[2, 40] = logits[2].max()  # the chosen token ties the maximum: rank 1
chosen = torch.randint(0, 1500, (7,), generator=g)
chosen[1], chosen[2] = 1, 40
# atol 1e-4 (issue 10's tolerance for logprobs): the interpreter's float32 exp is numpy's, whose
# SIMD and scalar paths round differently, so a row's sum varies by some ulps between processes
for x in (logits, logits.bfloat16()):
    lse, logprob, rank = logprob_stats(x, chosen)
    ref = _chunk(x, chosen, 4)
    assert torch.allclose(lse, x.float().logsumexp(-1), rtol=0, atol=1e-4)
    assert torch.allclose(logprob, ref["logprob"], rtol=0, atol=1e-4)
    assert torch.equal(rank, ref["rank"]) and rank[2] == 1
    got = token_logprobs(x, chosen, 4)  # TANDEM_SAMPLER=triton: the kernel path
    assert torch.equal(got["top_ids"], ref["top_ids"])
    assert torch.allclose(got["top_logprobs"], ref["top_logprobs"], rtol=0, atol=1e-4)
print("logprobs ok")
"""

PENALTIES = r"""
import sys, torch
sys.path.insert(0, "tests")
from test_penalties import _case, _reference
from tandem.worker import logits_processing
from tandem.worker.logits_processing import apply_penalties

for seed in range(4):
    logits, history, rows, plen, gen, pres, freq, rep, span = _case(seed, 9, 50 + 37 * seed, 40, torch.float32)
    want = _reference(logits, history, rows, plen, gen, pres, freq, rep)
    for per_pass in (9, 2):  # one pass, and passes of 2 rows
        logits_processing._PENALTY_ELEMENTS = per_pass * span
        got = logits.clone()
        apply_penalties(got, history, rows, plen, gen, pres, freq, rep, span)  # TANDEM_SAMPLER=triton
        assert torch.equal(got, want), seed
print("penalties ok")
"""

GRAMMAR_MASK = r"""
import torch
from tandem.worker import grammar_mask

for seed, (rows_total, vocab) in enumerate([(7, 100), (5, 4096 + 33), (3, 9000)]):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows_total, vocab, generator=g)
    rows = torch.randperm(rows_total, generator=g)[: rows_total - 1]
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1  # a row that allows everything
    bitmask[-1, 1:] = 0  # one that allows only its first 32 tokens' set bits
    want = logits.clone()
    allowed = grammar_mask.allowed_tokens(bitmask, vocab)
    want[rows] = want[rows].masked_fill(~allowed, float("-inf"))
    got = logits.clone()
    grammar_mask.apply_grammar_mask(got, rows, bitmask)  # TANDEM_SAMPLER=triton: the kernel, interpreted
    assert torch.equal(got, want), seed
print("grammar mask ok")
"""

ENGINE = r"""
import os, sys
sys.path.insert(0, "tests")
from differential import make_case, run_case

# The engine end to end with the sampling stage's kernels interpreted, against the torch
# definitions: random cases with penalties, logit bias, top-k/top-p/min-p, logprobs, float32.
for seed in (251, 35):  # each with penalties, logit bias, top-k/top-p and logprobs among its requests
    case = make_case(seed)
    os.environ["TANDEM_SAMPLER"] = "torch"
    ref = run_case(case, async_batching=False, dtype="float32")
    os.environ["TANDEM_SAMPLER"] = "triton"
    got = run_case(case, async_batching=True, dtype="float32")
    assert got.keys() == ref.keys()
    for rid in ref:  # tokens exactly; logprobs up to the float32 rounding of two log-sum-exps
        a, b = got[rid], ref[rid]
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), (case.describe(), rid)
        for la, lb in ((a.logprobs, b.logprobs), (a.prompt_logprobs, b.prompt_logprobs)):
            assert (la is None) == (lb is None)
            for ea, eb in zip(la or [], lb or []):
                assert (ea is None) == (eb is None)
                if ea is not None:
                    assert [(t, r) for t, _, r in ea] == [(t, r) for t, _, r in eb]
                    # tokens a grammar forbids have -inf on both sides (constrained cases)
                    assert max(0.0 if x == y else abs(x - y) for (_, x, _), (_, y, _) in zip(ea, eb)) < 1e-4
print("engine ok")
"""


def _run_interpreted(tmp_path: Path, script: str) -> str:
    # A file, not `python -c`: triton.jit reads the source of the kernels it compiles.
    path = tmp_path / "check.py"
    path.write_text(script)
    root = Path(__file__).parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "TANDEM_SAMPLER": "triton", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_cutoff_kernel_matches_the_sorted_definition(tmp_path):
    assert "cutoff ok" in _run_interpreted(tmp_path, CUTOFF)


def test_logprob_kernel_matches_the_torch_definition(tmp_path):
    assert "logprobs ok" in _run_interpreted(tmp_path, LOGPROBS)


def test_penalty_kernels_match_the_bincount_reference(tmp_path):
    assert "penalties ok" in _run_interpreted(tmp_path, PENALTIES)


def test_grammar_mask_kernel_matches_the_torch_unpacking(tmp_path):
    assert "grammar mask ok" in _run_interpreted(tmp_path, GRAMMAR_MASK)


def test_engine_with_sampling_kernels_matches_torch_definitions(tmp_path):
    assert "engine ok" in _run_interpreted(tmp_path, ENGINE)
