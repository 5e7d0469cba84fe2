"""The fused sampler: sample_reference (torch) against the sampling definition, and the Triton kernel
against sample_reference on CPU through Triton's interpreter (float32, tiny shapes). The kernel
checks run in a subprocess so TRITON_INTERPRET is set before Triton is imported."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.kernels import sampling
from tandem.kernels.sampling import fused_sample, sample_reference

INF = float("inf")


def _rows(n: int, temperature: float = 1.0, min_p: float = 0.0, cutoff: float = -INF,
          seeds: torch.Tensor | None = None, gen_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-row arguments of sample_reference / fused_sample, each [n]."""
    full = lambda value: torch.full((n,), value, dtype=torch.float32)  # noqa: E731
    return dict(temperature=full(temperature), min_p=full(min_p), cutoff=full(cutoff),
                seeds=torch.arange(n, dtype=torch.int64) * 7919 + 2**62 if seeds is None else seeds,
                gen_index=torch.zeros(n, dtype=torch.int64) if gen_index is None else gen_index)


# ---------------------------------------------------------------------------------------------
# sample_reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vary", ["seed", "gen_index"])
@pytest.mark.parametrize("temperature, min_p, top_k", [(0.7, 0.0, 0), (1.3, 0.2, 0), (1.0, 0.0, 3), (1.5, 0.1, 5)])
def test_reference_draws_softmax_over_the_eligible_tokens(dtype, vary, temperature, min_p, top_k):
    logits = (torch.randn(8, generator=torch.Generator().manual_seed(0)) * 1.5).to(dtype)
    cutoff = logits.sort(descending=True).values[top_k - 1].item() if top_k else -INF  # inclusive: k tokens
    x = logits.double() / temperature
    allowed = logits >= cutoff
    eligible = allowed & (x >= x[allowed].max() + (math.log(min_p) if min_p else -INF))
    expected = x.masked_fill(~eligible, -INF).softmax(-1)
    n = 20000
    if vary == "seed":  # many requests at one output index, or one request over many output indices
        seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(1))
        rows = _rows(n, temperature, min_p, cutoff, seeds=seeds)
    else:
        rows = _rows(n, temperature, min_p, cutoff, seeds=torch.full((n,), 2**62 + 17),
                     gen_index=torch.arange(n, dtype=torch.int64))
    ids = sample_reference(logits.expand(n, -1), **rows)
    freq = torch.bincount(ids, minlength=8).double() / n
    assert ids.dtype == torch.int64
    assert (freq[~eligible] == 0).all(), (freq, eligible)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)  # ~4 standard deviations at n = 20000


def test_reference_greedy_takes_the_first_argmax_and_ignores_cutoff_and_min_p():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    logits[1, [7, 3, 40]] = 10.0  # a tie: the smallest index wins
    rows = _rows(4, temperature=0.0, min_p=0.9, cutoff=INF)  # would leave a random row nothing
    expected = logits.argmax(-1)
    assert expected[1] == 3
    assert torch.equal(sample_reference(logits, **rows), expected)


def _mixed_batch(n: int, n_vocab: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rng = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n_vocab, generator=rng) * 2
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3])[torch.arange(n) % 4]
    min_p = torch.tensor([0.0, 0.05, 0.0, 0.2])[torch.arange(n) % 4]
    cutoff = torch.where(torch.arange(n) % 3 == 0, logits.sort(-1, descending=True).values[:, 40], -INF)
    return logits, dict(temperature=temperature, min_p=min_p, cutoff=cutoff,
                        seeds=torch.randint(0, 2**63 - 1, (n,), generator=rng),
                        gen_index=torch.randint(0, 2**40, (n,), generator=rng))


def test_reference_row_does_not_depend_on_its_batch_or_chunking(monkeypatch):
    logits, rows = _mixed_batch(9, 300, seed=3)
    full = sample_reference(logits, **rows)
    for i in range(9):
        assert sample_reference(logits[i:i + 1], **{k: v[i:i + 1] for k, v in rows.items()}) == full[i]
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_reference(logits[perm], **{k: v[perm] for k, v in rows.items()}), full[perm])
    for rows_per_chunk in (1, 2, 4):  # chunks of 1, 2 and 4 rows, the last one short
        monkeypatch.setattr(sampling, "_CHUNK_ELEMENTS", rows_per_chunk * 300)
        assert torch.equal(sample_reference(logits, **rows), full)


def test_reference_float64_logits_draw_the_float32_tokens():
    # Same noise, same definition, only the rounding of x and the logs differs: the draws agree
    # unless two scores are within float32 rounding of each other (not the case for these inputs).
    logits, rows = _mixed_batch(16, 500, seed=5)
    out64 = sample_reference(logits.double(), **rows)
    assert out64.dtype == torch.int64
    assert torch.equal(out64, sample_reference(logits, **rows))


def test_fused_sample_rejects_inputs_it_would_misread():
    logits, rows = _mixed_batch(4, 64, seed=6)
    with pytest.raises(ValueError, match="logits"):
        fused_sample(logits.double(), **rows)
    with pytest.raises(ValueError, match="seeds"):
        fused_sample(logits, **{**rows, "seeds": rows["seeds"].int()})


# ---------------------------------------------------------------------------------------------
# the Triton kernel, interpreted
# ---------------------------------------------------------------------------------------------

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton not installed (the test extra installs it)")

NOISE = r"""
import torch, triton, triton.language as tl
from tandem.kernels.sampling import uniform_noise
from tandem.kernels.sampling import _row_key, _uniform

@triton.jit
def noise_kernel(seeds_ptr, gen_index_ptr, out_ptr, n_vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(gen_index_ptr + row))
    tl.store(out_ptr + row * n_vocab + cols, _uniform(key, cols), mask=cols < n_vocab)

seeds = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**62 - 1, 2**62 + 12345, 2**63 - 1, -5])
gen_index = torch.tensor([0, 7, 2**32 + 3, 1, 2**40 + 9, 3, 2**63 - 1, 11])
out = torch.empty(8, 3001)
noise_kernel[(8,)](seeds, gen_index, out, 3001, BLOCK=4096)
assert torch.equal(out, uniform_noise(seeds, gen_index, 3001)), "noise differs"
print("noise ok")
"""

KERNEL = r"""
import math, torch
from tandem.kernels.sampling import uniform_noise
from tandem.kernels.sampling import fused_sample, sample_reference

# per row: temperature, target min_p, top-k cutoff rank (0: none). Greedy rows get a min_p and a
# cutoff too: the kernel must ignore them.
CONFIGS = [(0.0, 0.0, 0), (0.0, 0.3, 5), (1.0, 0.0, 0), (0.7, 0.05, 0), (1.3, 0.0, 50), (0.5, 0.1, 20),
           (2.0, 1.0, 0), (0.9, 0.3, 3), (1.0, 0.02, 200), (0.25, 0.0, 0), (1.5, 0.0, 1)]
TIES = (700, 5, 1029, 2500)  # a shared maximum within a block and (_BLOCK = 1024) across blocks in one lane


def min_p_between_tokens(x, target):
    # log(min_p) is computed by two log implementations that may differ in the last bit; put the
    # threshold x_max + log(min_p) midway between two neighbouring x values so no token is near it.
    dist = (x.max() - x).sort().values
    k = min(max(int(torch.searchsorted(dist, -math.log(target))), 1), len(dist) - 1)
    assert dist[k] - dist[k - 1] > 1e-4
    return math.exp(-(dist[k - 1] + dist[k]).item() / 2)


def race_margin(logits, temperature, min_p, cutoff, seed, gen_index):
    # The gap between the best and second-best eligible score, in float64. A float32 draw can flip
    # only if this is within rounding (~1e-6 here); the top two Gumbel scores are O(1) apart (Exp(1) for iid ones),
    # so 1e-3 holds for all but ~1 row in 1000 and these fixed inputs are checked, not hoped for.
    x = logits.double() / temperature
    allowed = logits >= cutoff
    eligible = allowed & (x >= x[allowed].max() + (math.log(min_p) if min_p else -math.inf))
    u = uniform_noise(seed.view(1), gen_index.view(1), len(logits))[0].double()
    top2 = (x - (-u.log()).log()).masked_fill(~eligible, -math.inf).topk(2).values
    return (top2[0] - top2[1]).item()


def check(n_vocab, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(CONFIGS)
    logits = torch.randn(n, n_vocab, generator=g) * (0.5 + 2.5 * torch.rand(n, 1, generator=g)) + 1.0
    temperature, min_p, cutoff = torch.zeros(n), torch.zeros(n), torch.full((n,), -math.inf)
    for i, (t, target, k) in enumerate(CONFIGS):
        if t in (0.0, 2.0):
            ties = [j for j in TIES if j < n_vocab]
            logits[i, ties] = logits[i].max() + 1
        temperature[i] = t
        cutoff[i] = logits[i].sort(descending=True).values[k - 1] if k else -math.inf
        allowed = logits[i] >= cutoff[i]
        exact = t == 0 or target in (0.0, 1.0)  # greedy ignores it; log(1) = 0 and log(0) = -inf are exact
        min_p[i] = target if exact else min_p_between_tokens(logits[i][allowed].double() / t, target)
    seeds = 2**62 + torch.randint(-2**20, 2**20, (n,), generator=g)
    seeds[2:4] = torch.tensor([2**63 - 1, 0])
    gen_index = torch.randint(0, 2**40, (n,), generator=g)
    for i in range(n):
        if temperature[i] > 0:
            margin = race_margin(logits[i], temperature[i].item(), min_p[i].item(), cutoff[i], seeds[i], gen_index[i])
            assert margin > 1e-3, (n_vocab, i, margin)
    ref = sample_reference(logits, temperature, min_p, cutoff, seeds, gen_index)
    out = fused_sample(logits, temperature, min_p, cutoff, seeds, gen_index)
    assert torch.equal(out, ref), (n_vocab, out, ref)
    for splits in (2, 3, 7):  # rows shared out over programs (ties across shares): the same draw
        assert torch.equal(fused_sample(logits, temperature, min_p, cutoff, seeds, gen_index, splits=splits), ref)
    assert out[0] == out[1] == 5  # greedy rows: the first of the tied maxima
    assert out[-1] == logits[-1].argmax()  # a cutoff at the top logit keeps that token (>=)
    half = logits.bfloat16()  # read as bf16 and widened in the kernel: the draw of the widened row
    assert torch.equal(fused_sample(half, temperature, min_p, cutoff, seeds, gen_index),
                       fused_sample(half.float(), temperature, min_p, cutoff, seeds, gen_index))


for n_vocab, seed in ((1000, 0), (3001, 1), (2048, 2)):  # one short block; a short third; two full
    check(n_vocab, seed)
print("kernel ok")
"""


def _run_interpreted(tmp_path: Path, script: str) -> str:
    # A file, not `python -c`: triton.jit reads the source of the kernels it compiles.
    path = tmp_path / "check.py"
    path.write_text(script)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@triton_only
def test_kernel_noise_is_bit_identical_to_uniform_noise(tmp_path):
    assert "noise ok" in _run_interpreted(tmp_path, NOISE)


@triton_only
def test_kernel_draws_the_reference_tokens(tmp_path):
    assert "kernel ok" in _run_interpreted(tmp_path, KERNEL)


@triton_only
def test_vocab_splits_fill_the_gpu_only_where_rows_are_few():
    cuda_like = torch.device("cpu")  # 8 SMs stand in for a GPU's count (tandem.kernels.num_sms)
    assert sampling.vocab_splits(1, 128256, cuda_like) == 31  # shares of at least 4 x 1024 entries
    assert sampling.vocab_splits(1, 256000, cuda_like) == 32  # capped
    assert sampling.vocab_splits(4, 128256, cuda_like) == 8  # 4 programs per SM x 8 SMs / 4 rows
    assert sampling.vocab_splits(64, 128256, cuda_like) == 1  # the rows alone fill it
    assert sampling.vocab_splits(1, 3000, cuda_like) == 1  # shares below 4 blocks are not worth a program
