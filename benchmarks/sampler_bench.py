"""Sampling on a CUDA GPU: the fused Triton kernel against the torch sampler, one table.

Usage: python scripts/sampler_bench.py

For a Llama-3 vocabulary (128256) and 32 / 256 / 1024 rows, times (median of do_bench):
  torch     tandem.worker.sampler.sample with top-p 0.9 rows (full sort of every row)
  torch-no-sort  the same rows without top-k/top-p
  fused     tandem.kernels.sampling.fused_sample (one program per row, no [rows, vocab] temporaries)
  sort      torch.sort of the float32 logits alone (what a top-k/top-p cutoff costs by sorting)
  topk1024  torch.topk(logits, 1024) (a candidate set for a cutoff)
  floor     the logits' bytes / a measured copy bandwidth
and the peak memory each path allocates beyond the logits. Agreement: fused vs the torch
reference ``sample_reference`` on the same rows (identical ids expected except float near-ties)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> int:
    import triton.testing

    from tandem.kernels.sampling import fused_sample, sample_reference
    from tandem.worker.sampler import SamplingTensors, sample

    vocab, dev = 128256, torch.device("cuda")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() / (copy_ms * 1e-3)
    del src, dst
    print(f"{'rows':>5} {'torch':>9} {'no-sort':>9} {'fused':>9} {'sort':>9} {'topk1024':>9} {'floor':>9} "
          f"{'torch MiB':>10} {'fused MiB':>10} {'agree':>7}")
    ok = True
    for rows in (32, 256, 1024):
        gen = torch.Generator(device=dev).manual_seed(rows)
        logits = torch.randn(rows, vocab, device=dev, generator=gen) * 3
        temp = torch.full((rows,), 0.8, device=dev)
        seeds = torch.randint(0, 2**62, (rows,), device=dev, generator=gen)
        gen_index = torch.randint(0, 1000, (rows,), device=dev, generator=gen)
        min_p = torch.zeros(rows, device=dev)
        cutoff = torch.full((rows,), float("-inf"), device=dev)
        sort_t = SamplingTensors(temp, torch.zeros(rows, dtype=torch.int64, device=dev), torch.full((rows,), 0.9,
                                 device=dev), min_p, seeds, gen_index, True, True)
        plain_t = SamplingTensors(temp, sort_t.top_k, torch.ones(rows, device=dev), min_p, seeds, gen_index, True,
                                  False)
        args = (logits, temp, min_p, cutoff, seeds, gen_index)
        times = {name: triton.testing.do_bench(fn) * 1e3 for name, fn in (
            ("torch", lambda: sample(logits, sort_t)), ("no-sort", lambda: sample(logits, plain_t)),
            ("fused", lambda: fused_sample(*args)), ("sort", lambda: logits.sort(dim=-1, descending=True)),
            ("topk", lambda: logits.topk(1024, dim=-1)))}
        floor_us = logits.numel() * 4 / bandwidth * 1e6
        try:
            torch_mib = f"{_peak_extra_mib(lambda: sample(logits, sort_t)):.0f}"
        except torch.OutOfMemoryError:
            torch_mib = "OOM"
        fused_mib = _peak_extra_mib(lambda: fused_sample(*args))
        agree = (fused_sample(*args) == sample_reference(*args)).float().mean().item()
        ok &= agree > 0.99
        print(f"{rows:>5} {times['torch']:>8.0f}u {times['no-sort']:>8.0f}u {times['fused']:>8.0f}u "
              f"{times['sort']:>8.0f}u {times['topk']:>8.0f}u {floor_us:>8.0f}u {torch_mib:>10} {fused_mib:>10.1f} "
              f"{agree:>7.1%}")
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
