"""Our Triton kernels against their torch references, on CPU through Triton's interpreter
(float32 math, tiny shapes). Each check runs in a subprocess so TRITON_INTERPRET is set before
Triton is imported."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Checked without importing it here: Triton's extension prints leak warnings at interpreter exit.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (the test extra installs it)")

CHECK = r"""
import random, torch
from tandem.kernels.paged_decode import paged_decode_attention
from tandem.model.attention import AttentionInputs
from tandem.model.attention.base import AttentionSpec
from tandem.model.attention.sdpa import SdpaBackend

def check(seed, hq, hkv, d, page, lens, window):
    torch.manual_seed(seed); rng = random.Random(seed)
    nblocks = 1 + sum(-(-n // page) for n in lens) + 2
    cache = torch.randn(2, nblocks * page, hkv, d)  # garbage in every slot the kernel must not read
    free = list(range(1, nblocks)); rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // page))] for n in lens]
    width = max(map(len, tables)) + 1  # an extra padded column, as graphs have
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    seq_lens = torch.tensor(lens)
    q = torch.randn(len(lens), hq, d)
    b = len(lens)
    sdpa = SdpaBackend()
    inputs = AttentionInputs(torch.zeros(b, dtype=torch.long), bt, torch.arange(b + 1), seq_lens, seq_lens - 1, 1,
                             page)
    ref = sdpa.attend(q, cache, sdpa.prepare(inputs), AttentionSpec(d ** -0.5, window))
    out = paged_decode_attention(q, cache, bt, seq_lens, page, d ** -0.5, window)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, (seed, hq, hkv, d, page, lens, window, err)
    return err

errs = [check(0, 6, 2, 24, 4, [1, 7, 64, 65, 130], None),
        check(1, 8, 2, 16, 16, [3, 16, 17, 200], None),
        check(2, 4, 4, 32, 8, [5, 90, 33], None),
        check(3, 6, 2, 24, 4, [1, 50, 129], 20)]
print("max rel err", max(errs))
"""


FUSED = r"""
import torch
from tandem.kernels import fused
from tandem.model.layers import kv, mlp, norms, rotary

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

torch.manual_seed(0)
errs = []
for rows, cols in ((5, 96), (3, 200)):
    x, res, w = torch.randn(rows, cols), torch.randn(rows, cols), 1 + 0.1 * torch.randn(cols)
    for r in (None, res):
        out, new_res = fused.add_rms_norm(x, r, w, 1e-5)
        ref_out, ref_res = norms.add_rms_norm(x, r, w, 1e-5)
        errs += [rel(out, ref_out), rel(new_res, ref_res)]
qkv = torch.randn(7, (6 + 2 + 2) * 24)  # q, k, v as strided views of one projection, head_dim 24
q, k, v = qkv[:, :144].view(7, 6, 24), qkv[:, 144:192].view(7, 2, 24), qkv[:, 192:].view(7, 2, 24)
cos, sin = rotary.rope_cos_sin(24, 10000.0, None, 64, torch.device("cpu"))
pos = torch.tensor([0, 3, 9, 63, 1, 2, 40])
slots = torch.tensor([5, 17, 2, 30, 11, 8, 23])
cache, ref_cache = torch.randn(2, 32, 2, 24), None
ref_cache = cache.clone()
ref_q = rotary.apply_rope(q, cos[pos], sin[pos])
kv.store_kv(ref_cache, rotary.apply_rope(k, cos[pos], sin[pos]), v, slots)
k_before, v_before = k.clone(), v.clone()
fused.rope_store_kv_(q, k, v, pos, cos, sin, cache, slots)
errs += [rel(q, ref_q), rel(cache, ref_cache)]
assert torch.equal(k, k_before) and torch.equal(v, v_before), "rope wrote into k or v"
untouched = torch.ones(32, dtype=torch.bool); untouched[slots] = False
assert torch.equal(cache[:, untouched], ref_cache[:, untouched]), "wrote outside the slots"
gu = torch.randn(4, 2 * 1500)
errs.append(rel(fused.silu_mul(gu), mlp.silu_mul(gu)))
assert max(errs) < 1e-6, errs
print("max rel err", max(errs))
"""


def _run_interpreted(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_paged_decode_kernel_matches_reference():
    assert "max rel err" in _run_interpreted(CHECK)


def test_fused_norm_rope_silu_kernels_match_reference():
    assert "max rel err" in _run_interpreted(FUSED)


ENGINE = r"""
import os, sys
sys.path.insert(0, "tests")
from differential import make_case, run_case

# The engine end to end with the Triton kernels (decode, varlen prefill/mixed steps, sampler's
# neighbours unchanged) interpreted on the CPU, against the SDPA reference: random cases with
# chunked prefill, preemption, aborts and sampling, float32.
for seed in range(6):
    case = make_case(7000 + seed)
    os.environ["TANDEM_ATTENTION"] = "sdpa"
    ref = run_case(case, async_batching=True, dtype="float32")
    os.environ["TANDEM_ATTENTION"] = "triton"
    got = run_case(case, async_batching=True, dtype="float32")
    assert got.keys() == ref.keys()
    for rid in ref:  # tokens exactly; logprobs up to float32 rounding of two attention kernels
        a, b = got[rid], ref[rid]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), (case.describe(), rid)
        for la, lb in ((a.logprobs, b.logprobs), (a.prompt_logprobs, b.prompt_logprobs)):
            assert (la is None) == (lb is None)
            for ea, eb in zip(la or [], lb or []):
                assert (ea is None) == (eb is None)
                if ea is not None:
                    assert [t for t, _, _ in ea] == [t for t, _, _ in eb]
                    assert max(abs(x - y) for (_, x, _), (_, y, _) in zip(ea, eb)) < 1e-4
print("engine ok")
"""


def test_engine_with_triton_kernels_matches_sdpa_reference():
    assert "engine ok" in _run_interpreted(ENGINE)


PIECEWISE = r"""
import torch
from tandem.config import EngineConfig
from tandem.contract.step import Padding
from tandem.engine.batch import build_step
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.runtime import create_worker
from tandem.sampling_params import SamplingParams
from tandem.worker.piecewise_graphs import PiecewiseGraphs

# The piecewise path (segments between attentions on static buffers, a token-padded step) against
# the plain forward, on a mixed step: the same tokens sampled and the same K/V written.
torch.manual_seed(0)
worker = create_worker(EngineConfig(MODEL, dtype="float32", device="cpu", kv_cache_tokens=512, block_size=4))
runner = worker.runner
gen = torch.Generator().manual_seed(3)
seqs, items, block = [], [], 1
for rid, (ctx, n) in enumerate([(0, 9), (5, 1), (12, 4), (0, 3)]):
    ids = torch.randint(0, 512, (ctx + n,), generator=gen).tolist()
    seq = Sequence(str(rid), ids, SamplingParams(temperature=0.0), seed=rid, max_new_tokens=4)
    seq.block_ids = list(range(block, block + -(-(ctx + n) // 4)))
    seq.row, block = rid, block + len(seq.block_ids)
    items.append(ScheduledSeq(seq, ctx, n, True, 0))
    if ctx:  # its earlier context: written by a plain step first
        pre = build_step(SchedulerOutput(0, [ScheduledSeq(seq, 0, ctx, False, 0)]), 4)
        runner.run(torch.from_numpy(pre.data), pre.shape, pre.sampler)
sched = SchedulerOutput(1, items)
plain = build_step(sched, 4)
cache_before = runner.kv_cache.clone()
want = runner.run(torch.from_numpy(plain.data), plain.shape, plain.sampler)
cache_plain = runner.kv_cache.clone()
runner.kv_cache.copy_(cache_before)
pw = PiecewiseGraphs(runner, 64, pool=None)
pw.prepare_eager()
padded = build_step(sched, 4, Padding(num_tokens=32))
bucket = pw.lookup(padded)
assert bucket is not None and bucket.tokens == 32
got = pw.run(bucket, torch.from_numpy(padded.data), padded)
assert got.tolist() == want.tolist(), (got, want)
assert torch.allclose(runner.kv_cache[:, :, 4:], cache_plain[:, :, 4:], atol=1e-5)  # block 0 takes padding
print("piecewise ok", got.tolist())
"""


@pytest.mark.parametrize("model", ["random:tiny", "random:tiny-gemma2"])  # Gemma: its own pieces, windows, soft-caps
def test_piecewise_segments_match_the_plain_forward(model):
    prefix = f"import os; os.environ['TANDEM_ATTENTION'] = 'triton'\nMODEL = {model!r}\n"
    assert "piecewise ok" in _run_interpreted(prefix + PIECEWISE)
