"""The FP8 KV cache on a GPU (``python scripts/gpu_kv_fp8.py``; needs compute capability >= 8.9).

1. The fused rotary + K/V store into an fp8 cache writes the bytes ``store_kv`` (torch's cast)
   writes for the same rotated K and V, bf16 inputs, scales 1 and not 1; every e4m3 value and tie
   through V.
2. The decode (single pass and split-KV) and varlen kernels on an fp8 cache vs the SDPA backend on
   the same cache (it dequantizes the gathered pages) in bf16, at the 8B model's heads; times of the
   decode kernel on a bf16 and an fp8 cache of the same tokens (it reads half the bytes).
3. The engine with ``kv_cache_dtype="fp8"`` (random:llama3.2-1b): sync == async token for token on
   each path (eager, graphs) in bf16 and float32, graphs == eager in float32; greedy agreement with
   the bf16 cache over the first 64 tokens (recorded)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def store_checks() -> bool:
    from tandem.kernels import fused
    from tandem.model.layers import kv, rotary

    ok, dev = True, torch.device("cuda")
    cos, sin = (t.to(torch.bfloat16) for t in rotary.rope_cos_sin(128, 500000.0, None, 4096, dev))
    qkv = (8 * torch.randn(300, (32 + 8 + 8) * 128, device=dev)).to(torch.bfloat16)
    q, k, v = qkv[:, :4096].view(300, 32, 128), qkv[:, 4096:5120].view(300, 8, 128), qkv[:, 5120:].view(300, 8, 128)
    pos, slots = torch.randint(0, 4096, (300,), device=dev), torch.randperm(1024, device=dev)[:300]
    # the kernel's rotation matches apply_rope's up to a last bf16 bit, which may move an fp8 rounding:
    # the reference stores the kernel's own rotated K (from a bf16 cache) through torch's cast
    plain = torch.zeros(2, 1024, 8, 128, dtype=torch.bfloat16, device=dev)
    fused.rope_store_kv_(q.clone(), k, v, pos, cos, sin, plain, slots)
    rotated = plain[0, slots]
    print(f"kv store: fused rotation == apply_rope in bf16 for "
          f"{(rotated == rotary.apply_rope(k, cos[pos], sin[pos])).float().mean().item():.4f} of K (recorded)")
    for scales in ((1.0, 1.0), (0.02, 0.5)):
        cache, ref = (torch.zeros(2, 1024, 8, 128, dtype=torch.float8_e4m3fn, device=dev) for _ in range(2))
        kv.store_kv(ref, rotated, v, slots, *scales)
        fused.rope_store_kv_(q.clone(), k, v, pos, cos, sin, cache, slots, *scales)
        same = torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
        ok &= same
        print(f"kv fp8 store, scales {scales}: fused bytes == store_kv bytes {same}")
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[~grid.isnan()].sort().values
    vals = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([1e4, -1e4, 449.0, 1e-9])]).to(dev)
    n = -(-len(vals) // 128)
    v_all = torch.cat([vals, torch.ones(n * 128 - len(vals), device=dev)]).view(n, 1, 128)
    cache = torch.zeros(2, n, 1, 128, dtype=torch.float8_e4m3fn, device=dev)
    fused.rope_store_kv_(torch.randn(n, 1, 128, device=dev), torch.randn(n, 1, 128, device=dev), v_all,
                         torch.zeros(n, dtype=torch.long, device=dev), cos.float(), sin.float(), cache,
                         torch.arange(n, device=dev))
    want = v_all.clamp(-448, 448).to(torch.float8_e4m3fn)
    same = torch.equal(cache[1].view(torch.uint8), want.view(torch.uint8))
    print(f"kv fp8 store: every e4m3 value, tie and saturation as torch casts them {same}")
    return ok and same


def kernel_checks() -> bool:
    from test_triton_varlen import make_paged_cache

    from tandem.bench.roofline import _time_ms
    from tandem.kernels.paged_decode import paged_decode_attention
    from tandem.kernels.paged_varlen import paged_varlen_attention
    from tandem.model.attention import AttentionInputs
    from tandem.model.attention.base import AttentionSpec
    from tandem.model.attention.sdpa import SdpaBackend

    ok, sdpa, page = True, SdpaBackend(), 16
    for label, chunks in (("decode", [(1, n) for n in (17, 900, 4096, 333)]), ("mixed", [(1, 700), (300, 300),
                                                                                        (64, 2000)])):
        q_lens, lens = [c[0] for c in chunks], [c[1] for c in chunks]
        dense, bt = make_paged_cache(lens, page, 8, 128, torch.bfloat16, "cuda")
        scales = (dense[0].abs().max().item() / 448, dense[1].abs().max().item() / 448)
        cache = torch.stack([(dense[i].float() / scales[i]).to(torch.float8_e4m3fn) for i in (0, 1)])
        query_start = torch.tensor([0, *itertools.accumulate(q_lens)], device="cuda")
        positions = torch.cat([torch.arange(n - m, n) for m, n in zip(q_lens, lens)]).to("cuda")
        q, seq_lens = torch.randn(len(positions), 32, 128, device="cuda", dtype=torch.bfloat16), torch.tensor(lens, device="cuda")
        spec = AttentionSpec(128 ** -0.5, None, k_scale=scales[0], v_scale=scales[1])
        inputs = AttentionInputs(torch.zeros_like(positions), bt, query_start, seq_lens, positions, max(q_lens), page)
        ref = sdpa.attend(q.float(), cache, sdpa.prepare(inputs), spec)
        outs = {"varlen": paged_varlen_attention(q, cache, bt, query_start, seq_lens, page, spec.scale, None,
                                                 max(q_lens), k_scale=scales[0], v_scale=scales[1])}
        if label == "decode":
            for splits in (1, 4, 16):
                outs[f"decode splits={splits}"] = paged_decode_attention(q, cache, bt, seq_lens, page, spec.scale, None,
                                                                         splits, k_scale=scales[0], v_scale=scales[1])
        for name, out in outs.items():
            err = _rel(out, ref)
            good = err < 1e-2 and not out.isnan().any()
            ok &= good
            print(f"kv fp8 {label} {name}: rel err {err:.1e} vs SDPA on the dequantized pages{'' if good else '  FAIL'}")
    b, ctx = 32, 4096
    dense, bt = make_paged_cache([ctx] * b, page, 8, 128, torch.bfloat16, "cuda")
    fp8 = dense.to(torch.float8_e4m3fn)
    q, seq_lens = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16), torch.full((b,), ctx, device="cuda")
    times = {name: _time_ms(lambda c=c: paged_decode_attention(q, c, bt, seq_lens, page, 0.088), 20)
             for name, c in (("bf16", dense), ("fp8", fp8))}
    print(f"kv decode B={b} ctx={ctx} 8B heads: {times['bf16'] * 1e3:.0f} us bf16 cache, {times['fp8'] * 1e3:.0f} us "
          f"fp8 cache ({times['bf16'] / times['fp8']:.2f}x)")
    return ok


def engine_checks() -> bool:
    """Sync == async on each path (eager, graphs) in bf16; graphs == eager only in float32, where no
    bf16 rounding difference between the captured and the eager decode flips a near-tie (RESULTS,
    issue 25: graphs differ from eager in bf16 for a bf16 cache too)."""
    from tandem import LLM, SamplingParams

    prompts = [torch.randint(0, 32000, (n,)).tolist() for n in (5, 40, 300, 17, 1000, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    runs = {}
    for dtype, kv, async_batching, eager in itertools.product(("bfloat16", "float32"), ("fp8", "auto"),
                                                              (False, True), (True, False)):
        if kv == "auto" and (dtype == "float32" or not async_batching or eager):
            continue  # the bf16-cache baseline: async with graphs only
        llm = LLM("random:llama3.2-1b", dtype=dtype, max_model_len=2048, kv_cache_dtype=kv,
                  async_batching=async_batching, enforce_eager=eager, gpu_memory_utilization=0.5)
        runs[(dtype, kv, async_batching, eager)] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                                               use_tqdm=False)]
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    sync_async = all(runs[(d, "fp8", False, e)] == runs[(d, "fp8", True, e)]
                     for d in ("bfloat16", "float32") for e in (True, False))
    graphs_eager = runs[("float32", "fp8", True, False)] == runs[("float32", "fp8", True, True)]
    fp8, bf16 = runs[("bfloat16", "fp8", True, False)], runs[("bfloat16", "auto", True, False)]
    agree = sum(a == b for x, y in zip(fp8, bf16) for a, b in zip(x, y))
    total = sum(len(x) for x in fp8)
    print(f"kv fp8 engine: sync == async (eager and graphs, bf16 and float32) {sync_async}; graphs == eager in "
          f"float32 {graphs_eager}; greedy agreement with the bf16 cache {agree}/{total} = {agree / total:.2f} of "
          "the first 64 tokens (recorded: random weights diverge at the first near-tie)")
    return sync_async and graphs_eager


if __name__ == "__main__":
    results = [store_checks(), kernel_checks(), engine_checks()]
    print("kv fp8:", "ok" if all(results) else "FAILED")
    sys.exit(0 if all(results) else 1)
