"""Correctness checks that need a CUDA GPU. Usage: python scripts/gpu_checks.py [smoke|differential|parity ...]

- kernels: the Triton paged decode kernel vs the SDPA reference in bf16 (error, and time of both).
- fused: fused add+RMSNorm / rotary / SiLU-mul kernels vs the torch ops, bf16.
- nosync: the async step loop runs under torch's sync debug mode without a synchronizing call.
- smoke: every executor variant (sync/async x eager/graphs) on random:tiny agrees, step by step.
- differential: the randomized sync-vs-async cases of the CPU test suite, on CUDA with graphs on.
- prefix: prefix caching on vs off over the CPU suite's shared-prefix cases, on CUDA with graphs on
  (TANDEM_PREFIX_DTYPE=float64 to rule out a float32 near-tie if one case differs).
- sampling: the sampling stage's Triton kernels (top-k/top-p cutoff, penalties) vs their torch
  definitions at a real vocabulary, and the engine with them vs the engine with the definitions.
- structured: grammar-constrained outputs on CUDA (scripts/gpu_structured.py: the constrained
  differential, specs accepted in bf16, no hidden sync with masks, the host's mask fill times).
- parity: float32 greedy outputs vs transformers, and bf16 prefill logits within 1e-2 relative error.
- moe: the fused MoE kernel vs its reference in bf16 at Qwen3-30B-A3B's and Mixtral 8x7B's shapes
  (error, NaN, peak workspace within the memory plan's), no hidden sync, a CUDA graph replaying it
  with new routing, FP8 and 4-bit experts vs their reference and their time against bf16
  (scripts/moe_bench.py).
- w4a16: the 4-bit weight kernel vs float32 arithmetic on the same weights in bf16 at the 8B shapes
  (decode, split-K and prefill tiers, act order), no hidden sync, graph replay (scripts/w4a16_bench.py).
- fp8: the FP8 linear (torch._scaled_mm) vs float32 arithmetic and the dequantized bf16 linear at the
  8B shapes, its speed, no sync, graph replay; the engine on an FP8 checkpoint (scripts/gpu_fp8.py).
- agreement: greedy tokens of random:llama3-8b with --quantization fp8 and int4 against bf16, 32 x
  (256 + 64), free-running and teacher-forced, beside bf16 at another batch size (rounding alone)
  (benchmarks/agreement.py; FP8 must reach 90% free-running).
- agreement_trained: the same on a tiny Llama trained here first (benchmarks/trained_tiny.py), whose
  greedy tokens are confident: 32 walks of its corpus x (32 + 64) (FP8 must reach 90% free-running).
- spec: the draft model's proposal graphs (worker/draft_graphs.py) vs the same function run eagerly
  on random:tiny (float32: identical proposals; bf16: the share that agrees, reported), no sync in
  a replay, and greedy draft speculation through the engine (graphs on) equal to none.
- gemma: Gemma's fused norm / norm-add-norm / GELU-tanh kernels vs the torch layers in bf16 at
  gemma3-1b's shapes (differences, bit-equal share, times), and sync == async on random:tiny-gemma3
  in bf16 with graphs (benchmarks/gpu_gemma.py).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]


def smoke() -> bool:
    from tandem import LLM, SamplingParams

    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 17, 40, 5, 9)]
    params = [SamplingParams(max_tokens=24, temperature=t, seed=i, ignore_eos=True) for i, t in
              enumerate((0.0, 0.8, 0.0, 1.2, 0.0))]
    results = {}
    for async_batching in (False, True):
        for eager in (True, False):
            llm = LLM("random:tiny", dtype="float32", async_batching=async_batching, enforce_eager=eager,
                      max_num_seqs=8, kv_cache_tokens=4096)
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[(async_batching, eager)] = [o.outputs[0].token_ids for o in outs]
            llm.engine.shutdown()
    ref = results[(False, True)]
    ok = all(v == ref for v in results.values())
    print(f"smoke: {len(results)} variants, outputs identical: {ok}")
    return ok


def no_hidden_sync() -> bool:
    """The async step loop must not synchronise behind our back (.item(), .tolist(), .cpu(), ...)."""
    from tandem import LLM, SamplingParams

    llm = LLM("random:llama3.2-1b", max_num_seqs=16, max_model_len=256)
    prompts = [torch.randint(0, 128000, (n,)).tolist() for n in (30, 70, 120, 9)]
    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True, detokenize=False)
    syncs = hidden_syncs(lambda: llm.generate(prompts, params, use_tqdm=False))
    print(f"no_hidden_sync: {len(syncs)} synchronizing calls in the async loop" + "".join(f"\n  {m}" for m in syncs[:5]))
    return not syncs


def hidden_syncs(run) -> list[str]:
    """The synchronising calls of ``run()`` under torch's sync debug mode, after one warm-up run
    (lazy initialisation may synchronise once)."""
    import warnings

    run()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def kernels() -> bool:
    """The Triton paged decode kernel vs the gather + SDPA reference, bf16, and their speed."""
    import random

    import triton.testing

    from tandem.kernels.paged_decode import paged_decode_attention
    from tandem.model.attention import AttentionInputs
    from tandem.model.attention.base import AttentionSpec
    from tandem.model.attention.sdpa import SdpaBackend

    ok = True
    for b, hq, hkv, d, page, ctx in ((32, 32, 8, 128, 16, 768), (256, 32, 8, 64, 16, 512), (7, 16, 8, 128, 16, 3000)):
        lens = torch.tensor([random.Random(i).randint(1, 2 * ctx) for i in range(b)], device="cuda")
        width = int(-(-lens.max().item() // page))
        cache = torch.randn(2, (b * width + 1) * page, hkv, d, device="cuda", dtype=torch.bfloat16)
        bt = (torch.randperm(b * width, device="cuda") + 1).view(b, width)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        sdpa = SdpaBackend()
        inputs = AttentionInputs(torch.zeros(b, dtype=torch.long, device="cuda"), bt,
                                 torch.arange(b + 1, device="cuda"), lens, lens - 1, 1, page)
        meta, spec = sdpa.prepare(inputs), AttentionSpec(d ** -0.5)
        ref = sdpa.attend(q.double(), cache.double(), meta, spec)
        out = paged_decode_attention(q, cache, bt, lens, page, d ** -0.5)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        t_kernel = triton.testing.do_bench(lambda: paged_decode_attention(q, cache, bt, lens, page, d ** -0.5))
        t_sdpa = triton.testing.do_bench(lambda: sdpa.attend(q, cache, meta, spec))
        kv_bytes = 2 * lens.sum().item() * hkv * d * 2
        print(f"kernel decode B={b} Hq={hq} Hkv={hkv} D={d} mean ctx={lens.float().mean():.0f}: rel err {err:.1e}, "
              f"triton {t_kernel * 1e3:.0f} us ({kv_bytes / (t_kernel * 1e-3) / 1e9:.0f} GB/s of KV), gather+SDPA "
              f"{t_sdpa * 1e3:.0f} us")
        ok &= err < 1e-2 and not torch.isnan(out).any().item()
    return ok


def fused_kernels() -> bool:
    """Fused add+RMSNorm, rotary and SiLU-mul vs the torch ops they replace, in bf16 on the GPU."""
    from tandem.kernels import fused
    from tandem.model.layers import kv, mlp, norms, rotary

    def report(name, out, ref):
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        exact = (out == ref).float().mean().item()
        print(f"fused {name}: rel err {err:.1e}, {exact:.2%} of elements bit-identical to the torch ops")
        return err < 1e-2 and not torch.isnan(out).any().item()

    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, res, w = torch.randn(300, 4096, **bf), torch.randn(300, 4096, **bf), 1 + 0.1 * torch.randn(4096, **bf)
    ok = report("add_rms_norm", fused.add_rms_norm(x, res, w, 1e-5)[0], norms.add_rms_norm(x, res, w, 1e-5)[0])
    qkv = torch.randn(300, 48 * 128, **bf)
    q, k, v = qkv[:, :4096].view(300, 32, 128), qkv[:, 4096:5120].view(300, 8, 128), qkv[:, 5120:].view(300, 8, 128)
    cos, sin = rotary.rope_cos_sin(128, 500000.0, None, 4096, torch.device("cuda"))
    cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    pos = torch.randint(0, 4096, (300,), device="cuda")
    slots = torch.randperm(1000, device="cuda")[:300]
    cache, ref_cache = torch.randn(2, 1000, 8, 128, **bf), None
    ref_cache = cache.clone()
    ref = rotary.apply_rope(q, cos[pos], sin[pos])
    kv.store_kv(ref_cache, rotary.apply_rope(k, cos[pos], sin[pos]), v, slots)
    ok &= report("rope q", fused.rope_store_kv_(q, k, v, pos, cos, sin, cache, slots), ref)
    ok &= report("rope k + store", cache, ref_cache)
    gu = torch.randn(300, 2 * 14336, **bf)
    ok &= report("silu_mul", fused.silu_mul(gu), mlp.silu_mul(gu))
    return ok


def _reported(case, problems: list[str]) -> bool:
    """Print a differing case with its differences; True if there were any."""
    if problems:
        print(case.describe() + "\n" + "\n".join(problems))
    return bool(problems)


def _differential_case(seed: int, dtype: str) -> tuple[str, list[str]]:
    from differential import compare, make_case, run_case

    case = make_case(seed)
    sync = run_case(case, False, device="cuda", dtype=dtype, cuda_graphs=True)
    asyn = run_case(case, True, device="cuda", dtype=dtype, cuda_graphs=True)
    return case.describe(), compare(case, sync, asyn)


def differential(num_cases: int, dtype: str) -> bool:
    """Seeds 5000...; ``TANDEM_DIFF_WORKERS`` processes share the GPU (each case builds two small
    engines, so the host, not the GPU, bounds a case's time)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    t0, failures = time.time(), 0
    seeds = range(5000, 5000 + num_cases)
    workers = int(os.environ.get("TANDEM_DIFF_WORKERS", "1"))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_differential_case, seeds, [dtype] * num_cases))
    else:
        results = [_differential_case(seed, dtype) for seed in seeds]
    for description, problems in results:
        if problems:
            print(description + "\n" + "\n".join(problems))
            failures += 1
    print(f"differential ({dtype}, CUDA graphs on): {num_cases - failures}/{num_cases} cases identical "
          f"in {time.time() - t0:.0f} s")
    return failures == 0


def prefix_caching(num_cases: int, dtype: str) -> bool:
    from differential import compare, make_case, run_case, run_case_with_stats, with_shared_prefixes

    t0, failures, hits = time.time(), 0, 0
    for seed in range(6000, 6000 + num_cases):
        case = with_shared_prefixes(make_case(seed))
        off = run_case(case, False, device="cuda", dtype=dtype, cuda_graphs=True, prefix_caching=False)
        on, stats = run_case_with_stats(case, bool(seed % 2), device="cuda", dtype=dtype, cuda_graphs=True)
        hits += stats.prefix_cache_hits
        # float32: the cached prefix's KV came from another batch's matmuls, so logits may sit a
        # rounding apart (tokens may not; TANDEM_PREFIX_DTYPE=float64 makes them exact)
        atol = 1e-4 if dtype == "float32" else 0.0
        failures += _reported(case, compare(case, off, on, names=("off", "on"), aborts_may_differ=True,
                                            logprob_atol=atol))
    print(f"prefix caching on == off ({dtype}, CUDA graphs on, sync and async): {num_cases - failures}/{num_cases} "
          f"cases identical, {hits} prompt tokens from the cache, in {time.time() - t0:.0f} s")
    return failures == 0


def _valid_top_p_cutoff(row: torch.Tensor, t: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                        cutoff: torch.Tensor, tol: float = 1e-5) -> bool:
    """Whether ``cutoff`` keeps a top-k/top-p set in float64 up to ``tol`` of probability mass."""
    x = row.double()
    kth = x.sort(descending=True).values[int(k) - 1] if int(k) > 0 else -float("inf")
    probs = torch.where(x >= kth, x / float(t), -float("inf")).softmax(-1)
    before, through = probs[x > cutoff].sum().item(), probs[x >= cutoff].sum().item()
    return bool(cutoff >= kth) and before < float(p) + tol and through >= float(p) - tol


def sampling_kernels(num_cases: int) -> bool:
    """Kernels vs definitions on CUDA (float32 logits, Llama 3's vocabulary), then whole runs."""
    from differential import compare, make_case, run_case

    from tandem.kernels.top_k_top_p import fused_cutoff
    from tandem.worker.sampler import top_k_top_p_cutoff

    g = torch.Generator(device="cuda").manual_seed(0)
    n, vocab = 256, 128256
    logits = torch.randn(n, vocab, device="cuda", generator=g) * 3
    logits[1] = logits[1].round(decimals=1)
    temperature = torch.rand(n, device="cuda", generator=g) + 0.2
    top_k = torch.where(torch.rand(n, device="cuda", generator=g) < 0.5, 0,
                        torch.randint(1, 200, (n,), device="cuda", generator=g))
    top_p = torch.rand(n, device="cuda", generator=g).clamp(min=0.05)
    want = top_k_top_p_cutoff(logits, temperature, top_k, top_p)
    got = fused_cutoff(logits, temperature, top_k, top_p)
    same = int((got == want).sum().item())
    # a row may differ where the mass kept reaches top_p within float32 summation order
    differing = (got != want).nonzero().flatten().tolist()
    near = [r for r in differing if _valid_top_p_cutoff(logits[r], temperature[r], top_k[r], top_p[r], got[r])]
    print(f"sampling cutoff kernel == sorted definition: {same}/{n} rows (vocab {vocab}); of the others, "
          f"{len(near)} at a top-p boundary within 1e-5 of mass")
    same += len(near)
    failures = 0
    for seed in range(7000, 7000 + num_cases):
        case = make_case(seed)
        os.environ["TANDEM_SAMPLER"] = "torch"
        ref = run_case(case, False, device="cuda", dtype="float32", cuda_graphs=True)
        os.environ["TANDEM_SAMPLER"] = "auto"
        out = run_case(case, True, device="cuda", dtype="float32", cuda_graphs=True)
        failures += _reported(case, compare(case, ref, out, names=("torch", "kernels"), logprob_atol=1e-4))
    print(f"engine with sampling kernels == with torch definitions: {num_cases - failures}/{num_cases} cases")
    return same == n and failures == 0


def _draft_rows(rng, num_rows: int, k: int, bs: int, num_blocks: int):
    """Rows of the draft's proposal function: random last k + 1 tokens at random lengths, each row
    keeping 1..k proposals, on distinct random blocks."""
    import numpy as np

    n = rng.integers(k + 1, 900, num_rows)
    kk = rng.integers(1, k + 1, num_rows)
    need = -(-(n - 1 + kk) // bs)
    blocks = rng.permutation(np.arange(1, num_blocks))[:need.sum()]
    table = np.zeros((num_rows, need.max()), np.int64)
    for i, chunk in enumerate(np.split(blocks, np.cumsum(need)[:-1])):
        table[i, :len(chunk)] = chunk
    return rng.integers(0, 512, (num_rows, k + 1)), n - k - 1, kk, table


def spec_draft() -> bool:
    import numpy as np

    from tandem import LLM, SamplingParams
    from tandem.model.loader import load_model
    from tandem.worker.draft_graphs import DraftGraphs, DraftModel, run_eager

    dev, bs, k, ok = torch.device("cuda"), 16, 4, True
    for dtype in (torch.float32, torch.bfloat16):
        model, rng = load_model("random:tiny", dev, dtype, 1024), np.random.default_rng(0)
        spec = model.kv_spec
        cache = torch.randn(spec.num_layers, 2, 1200 * bs, spec.num_kv_heads, spec.head_dim, device=dev).to(dtype)
        draft, same, total = DraftModel(model, cache, bs, 512), 0, 0
        graphs = DraftGraphs(draft, 16, 1024 // bs)
        for num_rows in (1, 3, 8, 13, 16):
            rows = _draft_rows(rng, num_rows, k, bs, 1200)
            before = cache.clone()
            with torch.inference_mode():
                eager = run_eager(draft, *rows).tolist()
                cache.copy_(before)
                replayed = graphs.run(*rows).tolist()
            same += sum(a == b for e, g in zip(eager, replayed) for a, b in zip(e, g))
            total += num_rows * k
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            next(iter(graphs.graphs.values())).graph.replay()
            synced = False
        except RuntimeError:
            synced = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ok &= not synced and (dtype == torch.bfloat16 or same == total)
        print(f"spec draft graphs ({dtype}): {same}/{total} proposals equal to eager, "
              f"{len(graphs.graphs)} graphs, replay synchronizes: {synced}")
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (2, 17, 40, 90)]
    params = SamplingParams(max_tokens=36, temperature=0.0, ignore_eos=True)
    outs, captured = [], []
    options = {"speculative_config": {"method": "draft", "model": "random:tiny", "num_speculative_tokens": 4}}
    for extra, async_batching in (({}, False), (options, False), (options, True)):
        llm = LLM("random:tiny", dtype="float32", async_batching=async_batching, max_num_seqs=8,
                  kv_cache_tokens=4096, **extra)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        if extra:
            captured.append(len(llm.engine.core.speculation.proposer.graphs.graphs))
        llm.engine.shutdown()
    print(f"spec draft through the engine (graphs on, {captured} draft graphs captured): sync, async equal "
          f"to no speculation: {outs[1] == outs[0]}, {outs[2] == outs[0]}")
    return ok and outs[1] == outs[0] and outs[2] == outs[0] and all(captured)


def _cases() -> int:
    return int(os.environ.get("TANDEM_DIFF_CASES", "30"))


def _from(module: str, name: str):
    """A check that lives in another script of this directory, imported only when it runs."""
    return lambda: getattr(__import__(module), name)()


CHECKS = {
    "smoke": smoke, "kernels": kernels, "fused": fused_kernels, "nosync": no_hidden_sync,
    "differential": lambda: differential(_cases(), "float32"),
    "prefix": lambda: prefix_caching(_cases(), os.environ.get("TANDEM_PREFIX_DTYPE", "float32")),
    "sampling": lambda: sampling_kernels(_cases()),
    "structured": _from("gpu_structured", "structured"), "moe": _from("moe_bench", "check"),
    "w4a16": _from("w4a16_bench", "check"), "fp8": _from("gpu_fp8", "fp8_checks"),
    "agreement": _from("agreement", "check"), "agreement_trained": _from("agreement", "check_trained"),
    "parity": _from("gpu_parity", "parity"), "spec": spec_draft,
    "gemma": lambda: __import__("benchmarks.gpu_gemma", fromlist=["check"]).check(_cases()),
}


def main(argv: list[str]) -> int:
    checks = argv or ["smoke", "differential"]
    unknown = [name for name in checks if name not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown check(s) {', '.join(map(repr, unknown))}; known: {', '.join(CHECKS)}")
    ok = True
    for name in checks:
        ok &= CHECKS[name]()
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
