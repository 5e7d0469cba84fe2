"""The fused MoE kernel (tandem/kernels/fused_moe.py) against its reference, experts_reference.

The alignment step (plain torch) is checked here directly; the Triton kernel runs in a subprocess
through Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is imported), float32,
tiny hidden sizes: its alignment on up to 300 tokens, the whole kernel on random shapes over tokens
1-128, experts 8-128, top-k 1-8."""
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.kernels.moe_align import (DECODE_BLOCKS, MEDIUM_BLOCKS, PREFILL_BLOCKS, align_tokens, max_blocks,
                                      moe_blocks, workspace_bytes)


def _random_ids(rng: random.Random, tokens: int, experts: int, k: int) -> torch.Tensor:
    """Top-k ids as routing makes them: k distinct experts per token, skewed towards a few."""
    hot = rng.sample(range(experts), max(k, experts // 4))
    rows = [rng.sample(hot if rng.random() < 0.7 else range(experts), k) for _ in range(tokens)]
    return torch.tensor(rows, dtype=torch.int32)


def _check_alignment(ids: torch.Tensor, experts: int, block_m: int) -> None:
    """Ids in [0, experts]; ``experts`` is the dropped-route sentinel: such slots appear nowhere."""
    a = align_tokens(ids, experts, block_m)
    flat, n = ids.reshape(-1).long(), ids.numel()
    blocks = max_blocks(n, experts, block_m)
    assert a.sorted_ids.shape == (blocks * block_m,) and a.expert_ids.shape == (blocks,)
    used = int(a.num_padded)
    counts = torch.bincount(flat, minlength=experts + 1)[:experts]  # the dropped slots' bin left out
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum()) and used % block_m == 0
    assert (a.sorted_ids[used:] == n).all(), "rows past the padded count hold the sentinel"
    live = a.sorted_ids[:used].long()
    real = live[live < n]
    owned = torch.nonzero(flat < experts).flatten().tolist()
    assert sorted(real.tolist()) == owned, "every kept (token, slot) appears exactly once, no dropped one"
    tile_expert = a.expert_ids[:used // block_m].long().repeat_interleave(block_m)
    assert (flat[real] == tile_expert[live < n]).all(), "each slot sits in a tile of its own expert"
    row = 0
    for e in range(experts):  # groups in expert order, slots in order, sentinels only at each group's end
        c = int(counts[e])
        group = live[row:row + (c + block_m - 1) // block_m * block_m]
        assert group[:c].tolist() == torch.nonzero(flat == e).flatten().tolist()
        assert (group[c:] == n).all()
        row += group.numel()


def _drop(rng: random.Random, ids: torch.Tensor, experts: int, share: float) -> torch.Tensor:
    """``ids`` with about ``share`` of its slots dropped (the sentinel id ``experts``)."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return torch.where(torch.rand(ids.shape, generator=g) < share, torch.full_like(ids, experts), ids)


def test_alignment_random():
    rng = random.Random(0)
    for _ in range(60):
        experts = rng.choice([8, 16, 32, 64, 128])
        k = rng.randint(1, min(8, experts))
        tokens = rng.choice([1, 2, 3, 7, 16, 33, 100, 512])
        _check_alignment(_random_ids(rng, tokens, experts, k), experts, rng.choice([16, 32, 64]))


def test_alignment_drops_sentinel_routes():
    """Expert parallelism's dropped routes (id E): in no group, so no tile computes them; the rows
    in use are exactly those of the kept routes alone."""
    rng = random.Random(7)
    for _ in range(40):
        experts, block_m = rng.choice([8, 16, 32, 64, 128]), rng.choice([16, 32, 64])
        k, tokens = rng.randint(1, min(8, experts)), rng.choice([1, 2, 5, 16, 33, 100, 512])
        ids = _drop(rng, _random_ids(rng, tokens, experts, k), experts, rng.choice([0.1, 0.5, 0.9]))
        _check_alignment(ids, experts, block_m)
    ids = torch.tensor([[0, 8], [8, 3], [8, 8]], dtype=torch.int32)  # a token with every route dropped
    _check_alignment(ids, 8, 16)
    assert int(align_tokens(ids, 8, 16).num_padded) == 32  # experts 0 and 3: one tile each
    every = torch.full((20, 4), 8, dtype=torch.int32)  # nothing held here: no rows in use at all
    _check_alignment(every, 8, 16)
    assert int(align_tokens(every, 8, 16).num_padded) == 0


def test_reference_skips_dropped_routes():
    """experts_reference: a dropped route (id E) adds exactly what a route with weight 0 adds, its
    weight unread (NaN here); ids outside [0, E] are refused."""
    from tandem.model.layers.experts import experts_reference, route

    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 16, generator=g)
    w13, w2 = torch.randn(8, 48, 16, generator=g) / 4, torch.randn(8, 16, 24, generator=g) / 5
    w, ids = route(torch.randn(12, 8, generator=g), 3, True)
    dropped = torch.rand(ids.shape, generator=g) < 0.5
    dropped[0] = True  # a token with every route dropped: an exact zero
    out = experts_reference(x, w13, w2, torch.where(dropped, float("nan"), w), torch.where(dropped, 8, ids))
    zero_weighted = experts_reference(x, w13, w2, torch.where(dropped, 0.0, w), ids)
    assert torch.equal(out[0], torch.zeros(16)) and torch.allclose(out, zero_weighted, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, experts_reference(x, w13, w2, w, ids), rtol=1e-3)  # the drops mattered
    for bad in (9, -1):
        with pytest.raises(ValueError, match=f"expert id {bad} outside"):
            experts_reference(x, w13, w2, w, torch.where(dropped, bad, ids))


def test_alignment_edges():
    # a group that ends exactly on a tile boundary, the next beginning in a fresh tile; one token
    # routes to both sides of that boundary; most experts receive nothing
    ids = torch.tensor([[0, 1]] * 1 + [[0, 5]] * 15 + [[1, 5]] * 2, dtype=torch.int32)
    _check_alignment(ids, 8, 16)
    a = align_tokens(ids, 8, 16)
    assert a.expert_ids[:4].tolist() == [0, 1, 5, 5] and int(a.num_padded) == 64  # 16 + 3 + 17 slots
    _check_alignment(torch.zeros(1, 1, dtype=torch.int32), 128, 16)  # one token, one expert
    _check_alignment(torch.full((40, 1), 7, dtype=torch.int32), 8, 16)  # everything to the last expert
    # repeated experts within a token (routing never makes them, the alignment need not care)
    _check_alignment(torch.tensor([[3, 3, 3]] * 6, dtype=torch.int32), 8, 16)


def test_block_table_and_workspace():
    assert moe_blocks(1, 8, 128) is DECODE_BLOCKS and moe_blocks(256, 8, 128) is DECODE_BLOCKS
    assert moe_blocks(512, 8, 128) is MEDIUM_BLOCKS and moe_blocks(4096, 8, 128) is PREFILL_BLOCKS
    assert moe_blocks(128, 2, 8) is MEDIUM_BLOCKS and moe_blocks(1024, 2, 8) is PREFILL_BLOCKS
    assert max_blocks(8, 128, 16) == 8 and max_blocks(4096, 8, 64) == 72
    # the worst step of Qwen3-30B-A3B at 8192 tokens in bf16: [T*k, I] and [T*k, H] dominate, the
    # alignment's buffers add a few MiB (scripts/gpu_checks.py moe compares this with the peak the
    # kernel allocates on a GPU)
    main = 8192 * 8 * (768 + 2048) * 2
    assert main < workspace_bytes(8192, 8, 128, 2048, 768, 2) < main + (8 << 20)
    assert workspace_bytes(4096, 1, 8, 64, 32, 4) < 4096 * 64 * 4  # k = 1: no per-slot copy, no sum


KERNEL = r"""
import math, random, torch
from tandem.kernels.fused_moe import fused_experts
from tandem.kernels.moe_align import DECODE_BLOCKS, MEDIUM_BLOCKS, PREFILL_BLOCKS
from tandem.model.layers.experts import experts, experts_reference, route

TABLES = [None, DECODE_BLOCKS, MEDIUM_BLOCKS, PREFILL_BLOCKS]

def weights(experts_n, hidden, inter, g):
    w13 = torch.randn(experts_n, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts_n, hidden, inter, generator=g) / inter ** 0.5
    return w13, w2

def compare(x, w13, w2, w, ids, act, blocks, what):
    out = fused_experts(x, w13, w2, w, ids, act, blocks)
    ref = experts_reference(x, w13, w2, w, ids, act)
    err = ((out - ref).norm() / ref.norm()).item()
    assert out.shape == ref.shape and not torch.isnan(out).any() and err < 1e-5, (what, err)
    return err

# the one-launch alignment equals its torch definition over the rows in use
from tandem.kernels.fused_moe import align
from tandem.kernels.moe_align import align_tokens
rng = random.Random(1)
for case in range(8):
    n_exp, block_m = (100 if case == 1 else rng.choice([8, 16, 32, 64, 128])), rng.choice([16, 32, 64])
    k = rng.randint(1, min(8, n_exp))
    tokens = rng.choice([1, 2, 5, 17, 64, 160, 300])
    ids = torch.stack([torch.randperm(n_exp)[:k] for _ in range(tokens)])  # int64 ids are taken too
    ids = ids if case == 2 else ids.int()
    if case % 5 == 0:
        ids = ids % 3  # crowded: three experts take every slot
    got, want = align(ids, n_exp, block_m), align_tokens(ids, n_exp, block_m)
    used = int(want.num_padded)  # past it the kernel's buffers are never read, so left unwritten
    assert torch.equal(got.num_padded, want.num_padded), (tokens, n_exp, k, block_m)
    assert torch.equal(got.sorted_ids[:used], want.sorted_ids[:used]), (tokens, n_exp, k, block_m)
    assert torch.equal(got.expert_ids[:used // block_m], want.expert_ids[:used // block_m])

# with dropped routes (the sentinel id E, expert parallelism's routes to other ranks' experts): the
# same placement, so the kernel's rows in use are those of the kept routes alone
for case in range(6):
    n_exp, block_m = rng.choice([8, 16, 64, 128]), rng.choice([16, 32, 64])
    k, tokens = rng.randint(1, min(8, n_exp)), rng.choice([1, 3, 17, 64, 300])
    ids = torch.stack([torch.randperm(n_exp)[:k] for _ in range(tokens)]).int()
    share = 1.0 if case == 0 else rng.choice([0.2, 0.5, 0.875])  # case 0: nothing held here
    ids = torch.where(torch.rand(ids.shape) < share, torch.full_like(ids, n_exp), ids)
    got, want = align(ids, n_exp, block_m), align_tokens(ids, n_exp, block_m)
    used = int(want.num_padded)
    assert torch.equal(got.num_padded, want.num_padded), ("dropped", tokens, n_exp, k, block_m)
    assert torch.equal(got.sorted_ids[:used], want.sorted_ids[:used]), ("dropped", tokens, n_exp, k, block_m)
    assert torch.equal(got.expert_ids[:used // block_m], want.expert_ids[:used // block_m])

errs, rng = [], random.Random(0)
# random shapes: tokens 1-128 (log-uniform; the alignment above took the longer slot lists, whose
# counting runs in several chunks), experts 8-128, top-k 1-8
for case in range(8):
    g = torch.Generator().manual_seed(case)
    n_exp = 128 if case == 5 else rng.choice([8, 16, 32, 64, 128])
    k = 1 if case == 3 else rng.randint(1, min(8, n_exp))  # k = 1: the per-slot output is the result
    tokens = min(128, int(math.exp(rng.uniform(0, math.log(128)))) + (case == 0) * 127)
    hidden, inter = rng.choice([16, 24, 32, 64]), rng.choice([16, 40, 64])
    act = rng.choice(["silu", "gelu_pytorch_tanh"])
    x = torch.randn(tokens, hidden, generator=g)
    w13, w2 = weights(n_exp, hidden, inter, g)
    w, ids = route(torch.randn(tokens, n_exp, generator=g) * 3, k, rng.random() < 0.5)
    what = dict(tokens=tokens, experts=n_exp, k=k, hidden=hidden, inter=inter, act=act)
    errs.append(compare(x, w13, w2, w, ids, act, TABLES[case % 4], what))

# experts no token routes to are never read: poisoned with NaN, the output stays finite
g = torch.Generator().manual_seed(100)
x = torch.randn(30, 32, generator=g)
w13, w2 = weights(16, 32, 24, g)
w, ids = route(torch.randn(30, 16, generator=g), 4, True)
ids = torch.where(ids == 5, 6, ids)  # expert 5 unused (6 may now repeat within a token: still a valid sum)
unused = torch.ones(16, dtype=torch.bool)
unused[ids.unique().long()] = False
w13_bad, w2_bad = w13.clone(), w2.clone()
w13_bad[unused], w2_bad[unused] = float("nan"), float("nan")
errs.append(compare(x, w13_bad, w2_bad, w, ids, "silu", None, "unrouted experts"))

# one group ending exactly on a tile boundary, and a token whose experts sit on both sides of it
ids = torch.tensor([[0, 1]] + [[0, 3]] * 15 + [[1, 3], [2, 0]], dtype=torch.int32)
x = torch.randn(ids.shape[0], 16, generator=g)
w13, w2 = weights(8, 16, 32, g)
w = torch.rand(ids.shape, generator=g)
errs.append(compare(x, w13, w2, w, ids, "gelu_pytorch_tanh", DECODE_BLOCKS, "tile boundary"))

# dropped routes (id E) against the reference, which skips them: a share of every token's slots,
# some tokens with all of them (k = 1 included: there the output row is zeroed, not summed). Their
# weights are NaN and every buffer torch.empty hands the kernel is poisoned (NaN, or int garbage):
# a dropped slot's weight or per-slot row, or any row or tile past the rows in use, that were read
# would show in the output.
empty = torch.empty
def poisoned(*args, **kwargs):
    t = empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(1 << 30)
def dropped_case(case):
    g = torch.Generator().manual_seed(200 + case)
    n_exp, k = rng.choice([8, 16, 32]), (1 if case < 2 else rng.randint(2, 8))
    tokens, hidden, inter = rng.choice([1, 5, 40, 100]), rng.choice([16, 32]), rng.choice([16, 40])
    x = torch.randn(tokens, hidden, generator=g)
    w13, w2 = weights(n_exp, hidden, inter, g)
    w, ids = route(torch.randn(tokens, n_exp, generator=g) * 3, k, True)
    dropped = torch.rand(ids.shape, generator=g) < rng.choice([0.3, 0.6])
    dropped[0] = True  # the first token: nothing held here
    ids, w = torch.where(dropped, n_exp, ids).int(), torch.where(dropped, float("nan"), w)
    torch.empty = poisoned
    try:
        out = fused_experts(x, w13, w2, w, ids, "silu", TABLES[case % 4])
    finally:
        torch.empty = empty
    ref = experts_reference(x, w13, w2, w, ids)
    assert torch.equal(out[0], torch.zeros(hidden)) and not torch.isnan(out).any(), case
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, ("dropped", tokens, n_exp, k, err)
    return err
errs += [dropped_case(case) for case in range(6)]

# the entry point the models call dispatches to the kernel under TANDEM_MOE=triton
import os
os.environ["TANDEM_MOE"] = "triton"
ids = ids[:4]
out = experts(x[:4], w13, w2, w[:4], ids)
assert torch.equal(out, fused_experts(x[:4], w13, w2, w[:4], ids))
assert fused_experts(x[:0], w13, w2, w[:0], ids[:0]).shape == (0, 16)
# half precision through the interpreter: the same roundings as the reference, up to the last bits
x16, w13_16, w2_16 = x.half(), w13.half(), w2.half()
x16 = x16[:4]
out, ref = fused_experts(x16, w13_16, w2_16, w[:4], ids), experts_reference(x16, w13_16, w2_16, w[:4], ids)
assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3
print("max rel err", max(errs))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_fused_kernel_matches_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", KERNEL], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "max rel err" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_kernel_bench_moe_harness_runs():
    """scripts/kernel_bench.py moe on tiny shapes through the interpreter: the harness the GPU run uses."""
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "kernel_bench.py"), "moe", "--cpu-smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("ALL OK"), proc.stdout + proc.stderr


ENGINE = r"""
import os, torch
from tandem import LLM, SamplingParams

# The tiny MoE presets end to end, their experts through the kernel (interpreted) vs the reference:
# async, chunked prefill (16-token budget: mixed steps), greedy, float32.
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
for preset in ("random:tiny-qwen3-moe", "random:tiny-mixtral"):
    runs = {}
    for mode in ("reference", "triton"):
        os.environ["TANDEM_MOE"] = mode
        llm = LLM(preset, dtype="float32", async_batching=True, max_num_seqs=4, max_num_batched_tokens=16,
                  kv_cache_tokens=1024, max_model_len=128)
        runs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
    assert runs["triton"] == runs["reference"], (preset, runs)
print("engine ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_engine_with_fused_kernel_matches_reference():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", ENGINE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "engine ok" in proc.stdout, proc.stdout + proc.stderr
