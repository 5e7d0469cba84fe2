"""``kv_cache_dtype="fp8_e5m2"``: the FP8 KV cache in e5m2 (range to +-57344, two mantissa bits),
against references written from the definition, as ``test_kv_fp8`` does for e4m3: the store saturates
and rounds to nearest even, the Triton kernels (interpreted) and the SDPA path read it back through
the layer's scales, and the engine's outputs equal those of a float cache holding K/V rounded
through e5m2."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from differential import compare, make_case, run_case
from test_kv_fp8 import _run_interpreted, needs_triton
from tandem.model.layers.kv import store_kv, to_cache_dtype
from tandem.worker.kv_cache import resolve_kv_dtype

E5M2_MAX = 57344.0


def round_e5m2(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x after a trip through an e5m2 cache with this scale, in x's dtype."""
    return ((x.float() / scale).clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2).float() * scale).to(x.dtype)


def test_option_resolves_and_the_store_saturates():
    assert resolve_kv_dtype("fp8_e5m2", torch.float32, torch.device("cpu")) == torch.float8_e5m2
    x = torch.tensor([1e6, -1e6, 60000.0, 3.3, -0.0123, 1e-9])
    got = to_cache_dtype(x, torch.float8_e5m2, 1.0).float()
    assert got[0] == E5M2_MAX and got[1] == -E5M2_MAX and got[2] == E5M2_MAX  # no infinities
    assert torch.isfinite(got).all() and not torch.equal(got[3:5], x[3:5])  # the rounding is real
    cache = torch.zeros(2, 8, 2, 4, dtype=torch.float8_e5m2)
    k, v = 30 * torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    store_kv(cache, k, v, torch.tensor([1, 6, 3]), 0.5, 2.0)
    assert torch.equal(cache[0, [1, 6, 3]].float() * 0.5, round_e5m2(k, 0.5))
    assert torch.equal(cache[1, [1, 6, 3]].float() * 2.0, round_e5m2(v, 2.0))


KERNELS = r"""
import itertools, torch
from test_kv_fp8_e5m2 import round_e5m2, E5M2_MAX
from test_triton_varlen import make_paged_cache, rel_err
from tandem.kernels import fused
from tandem.kernels.paged_decode import paged_decode_attention
from tandem.kernels.paged_varlen import paged_varlen_attention
from tandem.model.attention import AttentionInputs
from tandem.model.attention.base import AttentionSpec
from tandem.model.attention.sdpa import SdpaBackend
from tandem.model.layers import rotary

# The fused rotary + store writes torch's cast of every e5m2 value, the midpoints between neighbours
# (ties to even), values that saturate or flush to zero, both signs (through V at position 0).
grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2).float()
grid = grid[torch.isfinite(grid)].sort().values
vals = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([1e6, -1e6, 58000.0, 61000.0, 1e-9, -1e-9])])
n_tok = -(-len(vals) // 48)
v = torch.cat([vals, torch.ones(n_tok * 48 - len(vals))]).view(n_tok, 2, 24)
cos, sin = rotary.rope_cos_sin(24, 10000.0, None, 64, torch.device("cpu"))
for v_scale in (1.0, 0.5):
    cache = torch.zeros(2, n_tok, 2, 24, dtype=torch.float8_e5m2)
    fused.rope_store_kv_(torch.randn(n_tok, 2, 24), torch.randn(n_tok, 2, 24), v * v_scale,
                         torch.zeros(n_tok, dtype=torch.long), cos, sin, cache, torch.arange(n_tok), 1.0, v_scale)
    want = v.clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2)
    assert torch.equal(cache[1].view(torch.uint8), want.view(torch.uint8)), v_scale

# Decode (single pass and split-KV) and varlen on an e5m2 cache against SDPA on a float32 cache of the
# values rounded through e5m2.
torch.manual_seed(40)
errs = []
for chunks, splits, k_scale, v_scale in (([(1, 5), (1, 300), (1, 90)], (1, 4), 0.5, 0.1),
                                         ([(20, 150), (13, 13)], (), 0.02, 3.0)):
    q_lens, lens = [c[0] for c in chunks], [c[1] for c in chunks]
    exact, bt = make_paged_cache(lens, 8, 2, 32)
    exact[0] *= 40 * k_scale
    exact[1] *= 50 * v_scale
    cache = torch.stack([exact[0] / k_scale, exact[1] / v_scale]).to(torch.float8_e5m2)
    rounded = torch.stack([round_e5m2(exact[0], k_scale), round_e5m2(exact[1], v_scale)])
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)])
    positions = torch.cat([torch.arange(n - m, n) for m, n in zip(q_lens, lens)])
    q, seq_lens = 0.05 * torch.randn(len(positions), 4, 32), torch.tensor(lens)
    sdpa = SdpaBackend()
    meta = sdpa.prepare(AttentionInputs(torch.zeros(len(positions), dtype=torch.long), bt, query_start, seq_lens,
                                        positions, max(q_lens), 8))
    ref = sdpa.attend(q, rounded, meta, AttentionSpec(32 ** -0.5, None, None))
    assert rel_err(sdpa.attend(q, cache, meta, AttentionSpec(32 ** -0.5, None, None, k_scale=k_scale,
                                                              v_scale=v_scale)), ref) < 1e-6
    assert rel_err(sdpa.attend(q, exact, meta, AttentionSpec(32 ** -0.5, None, None)), ref) > 1e-3
    errs.append(rel_err(paged_varlen_attention(q, cache, bt, query_start, seq_lens, 8, 32 ** -0.5, None,
                                               max(q_lens), None, k_scale=k_scale, v_scale=v_scale), ref))
    for n in splits:
        errs.append(rel_err(paged_decode_attention(q, cache, bt, seq_lens, 8, 32 ** -0.5, None, num_splits=n,
                                                   k_scale=k_scale, v_scale=v_scale), ref))
assert max(errs) < 1e-5, errs
print("e5m2 kernels ok", max(errs))
"""


@needs_triton
def test_kernels_on_an_e5m2_cache_match_rounded_reference():
    assert "e5m2 kernels ok" in _run_interpreted(KERNELS)


@needs_triton
def test_the_e5m2_store_compiles_for_h100():
    from tandem.kernels import fused, paged_decode
    from test_triton_compile import _compile

    _compile(fused._rope_store_kv_kernel, {"*": "*bf16", "kc_ptr": "*fp8e5", "vc_ptr": "*fp8e5", "pos_ptr": "*i64",
                                           "slot_ptr": "*i64"},
             dict(HALF=64, HALF_PAD=64, Q_PAD=32, KV_PAD=8, FP8_MANTISSA=2, FP8_MIN_EXP=-14, FP8_MAX=E5M2_MAX))
    _compile(paged_decode._paged_decode_kernel, {"*": "*bf16", "cache_ptr": "*fp8e5", "block_tables_ptr": "*i64",
                                                 "seq_lens_ptr": "*i64", "part_acc_ptr": "*fp32",
                                                 "part_stats_ptr": "*fp32"},
             dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, DIM_PAD=128, PAGE=16, BLOCK_N=64, NUM_SPLITS=1, MIN_SPLIT=256,
                  SOFTCAP=False, PRECISION="tf32"))


def test_engine_e5m2_matches_explicit_rounding(monkeypatch):
    """The engine with an e5m2 cache (SDPA path, CPU) gives the outputs of a float cache holding K/V
    rounded through e5m2, logprobs included; sync == async."""
    from tandem.model.models import llama

    case = make_case(2501)
    fp8 = dataclasses.replace(case, engine={**case.engine, "kv_cache_dtype": "fp8_e5m2"})
    got_sync, got_async = run_case(fp8, async_batching=False), run_case(fp8, async_batching=True)

    def rounding_store(cache, k, v, slot_mapping, k_scale=1.0, v_scale=1.0):
        assert cache.dtype != torch.float8_e5m2
        store_kv(cache, round_e5m2(k, k_scale), round_e5m2(v, v_scale), slot_mapping)

    monkeypatch.setattr(llama, "store_kv", rounding_store)
    rounded = run_case(case, async_batching=False)
    assert not compare(case, rounded, got_sync, names=("rounded", "e5m2")), case.describe()
    assert not compare(case, got_sync, got_async), case.describe()


def test_the_cli_takes_it(capsys):
    from tandem.cli import main

    assert main(["generate", "--model", "random:tiny", "--kv-cache-dtype", "fp8_e5m2", "--prompt", "hello",
                 "--max-tokens", "4"]) == 0
    assert "4 tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fp8_e5m2"):  # the refusal of an unknown type names the known ones
        resolve_kv_dtype("fp8_e3m4", torch.float32, torch.device("cpu"))
