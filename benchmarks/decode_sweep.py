"""Tune the paged decode kernel on a CUDA GPU: splits x key block x warps x pipeline stages, for the
decode steps of workloads S (Llama-3-8B, 32 sequences at ~768 keys) and M (Llama-3.2-1B, 256 at
~512). Prints each shape's best configurations, time and fraction of the KV bandwidth floor.
``fp8``: the same over an fp8 (e4m3) cache, one byte per element (``kv_cache_dtype="fp8"``).

Usage: python scripts/decode_sweep.py [fp8]"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

SHAPES = {"S: 8B B=32 ctx~768": (32, 32, 8, 128, 768), "M: 1B B=256 ctx~512": (256, 32, 8, 64, 512)}
# (splits, keys per block, warps, pipeline stages) tried per shape
GRID = {"S": ((1, 2, 4, 8), (64, 128), (4, 8), (2, 3, 4)), "M": ((1, 2), (32, 64, 128), (4, 8), (2, 3))}


def main(argv: list[str]) -> int:
    import triton.testing

    from tandem.kernels.paged_decode import paged_decode_attention
    from test_triton_varlen import make_paged_cache

    dev, page = torch.device("cuda"), 16
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    bandwidth = 2 * src.numel() / (triton.testing.do_bench(lambda: src.clone()) * 1e-3)
    del src
    for label, (b, hq, hkv, d, ctx) in SHAPES.items():
        lens = [random.Random(i).randint(ctx // 2, 3 * ctx // 2) for i in range(b)]
        cache, tables = make_paged_cache(lens, page, hkv, d, torch.bfloat16, dev)
        if argv == ["fp8"]:
            cache = cache.to(torch.float8_e4m3fn)
        seq_lens = torch.tensor(lens, device=dev)
        q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev)
        floor_us = (2 * sum(lens) * hkv * d * cache.element_size() + 2 * q.numel() * 2) / bandwidth * 1e6
        rows = []
        for splits, block_n, warps, stages in itertools.product(*GRID[label[0]]):
            fn = lambda: paged_decode_attention(q, cache, tables, seq_lens, page, d ** -0.5, None, splits,  # noqa: E731
                                                block_n, warps, stages)
            try:
                rows.append((triton.testing.do_bench(fn) * 1e3, splits, block_n, warps, stages))
            except Exception as exc:  # a configuration that does not compile (too much shared memory)
                print(f"  {label} splits={splits} block_n={block_n} warps={warps} stages={stages}: {exc!s:.80}")
        rows.sort()
        default = triton.testing.do_bench(lambda: paged_decode_attention(q, cache, tables, seq_lens, page,
                                                                         d ** -0.5)) * 1e3
        print(f"{label}: floor {floor_us:.1f} us; the engine's launch today {default:.1f} us "
              f"({floor_us / default:.1%})")
        for us, splits, block_n, warps, stages in rows[:6]:
            print(f"  {us:7.1f} us ({floor_us / us:5.1%} of floor): splits={splits} block_n={block_n} "
                  f"warps={warps} stages={stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
