"""A fixed program for Nsight Compute: the decode-size quantized GEMMs of the 8B shape, each launched
a few times, so ``ncu -k regex:...`` can read their memory and stall counters (issue 28: why the W4A16
one-row kernel runs at a quarter of its floor). Usage (CUDA):

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats \\
        python3 scripts/ncu_quant.py [--name gate_up] [--rows 1]

Kernels, in order: bf16 ``torch.matmul`` (cuBLAS), the W4A16 kernel, the W8A16 kernel."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main(argv: list[str]) -> int:
    from quant_tune import call, make

    p = argparse.ArgumentParser()
    p.add_argument("--name", default="gate_up", choices=SHAPES)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    n, k = SHAPES[args.name]
    x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w4, w8 = make("w4a16", n, k, 1, "cuda")[0], make("w8a16", n, k, 1, "cuda")[0]
    for _ in range(args.repeat):
        torch.matmul(x, dense.t())
        call("w4a16", x, w4, None)
        call("w8a16", x, w8, None)
    torch.cuda.synchronize()
    print(f"{args.name} [{n} x {k}], {args.rows} rows: done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
