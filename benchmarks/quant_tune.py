"""Tile sweep for the weight-only GEMMs at decode sizes (GPU): W8A16 (FP8 weights), W4A16, and the
one-row GEMV of bf16 weights (``kernels/gemv.py``, against cuBLAS at batch 1).

    python3 scripts/quant_tune.py [OUT_DIR] [--quick] [--kind=w8a16|w4a16|gemv] [--rows=M] [--fp8-paths] [--layout=k]

(W4A16 rows 1 to 256: the one-row kernel, split-K dot tiles up to 16 rows, GEMM tiles above. The GEMV
also runs the 1B model's shapes and both LM heads.)

Times each kernel inside a CUDA graph that cycles through enough copies of the weight to pass
256 MB, so the weights come from HBM (not the 50 MB L2) and no Python launch cost is counted: what a
decode step's graph replay sees. For each 8B-shape GEMM and row count it prints the bf16 GEMM, the
engine's default tiles, the best tiles found, and the fraction of the bytes floor each reaches;
results go to OUT_DIR/quant_tune.json. Tiles compile first in a process pool (the Triton cache is
shared on disk), then are timed one at a time."""
from __future__ import annotations

import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMV_SHAPES = {**SHAPES, "lm_head": (128256, 4096), "qkv_1b": (3072, 2048), "o_1b": (2048, 2048),
               "gate_up_1b": (16384, 2048), "down_1b": (2048, 8192), "lm_head_1b": (128256, 2048)}
ROWS = {"w8a16": (1, 16, 32, 64), "w4a16": (1, 8, 16, 32, 64, 128, 256), "gemv": (1,)}


def shapes(kind: str) -> dict[str, tuple[int, int]]:
    return GEMV_SHAPES if kind == "gemv" else SHAPES
HBM = 3.35e12
ROTATE_BYTES = 256 << 20


def w8_grid(m: int) -> list:
    from tandem.kernels.w8a16 import W8Tiles

    plain = [W8Tiles(bn, bk, s, w, st) for bn, bk, w, st, s in
             itertools.product((32, 64, 128), (128, 256), (4, 8), (3, 5), (1, 2, 4, 8, 16))]
    return plain + [W8Tiles(bn, bk, s, w, st, swap=True) for bn, bk, w, st, s in  # wgmma M: 64 per warp group
                    itertools.product((64, 128), (128, 256), (4,), (3, 4), (1, 2, 4, 8, 16))]


def gemv_grid(m: int) -> list:
    from tandem.kernels.gemv import GemvTiles

    return [GemvTiles(bn, bk, s, w) for bn, bk, w, s in
            itertools.product((8, 16, 32, 64), (256, 512, 1024), (4, 8), (1, 2, 4, 8, 16))]


def grid_of(kind: str, m: int) -> list:
    return {"w8a16": w8_grid, "w4a16": w4_grid, "gemv": gemv_grid}[kind](m)


def w4_grid(m: int) -> list:
    from tandem.kernels.w4a16 import W4Tiles

    if m == 1:  # the one-row kernel (its loads are prefetched by hand: no stages to sweep)
        return [W4Tiles(1, bn, bk, s, w, 1, True, gemv=True) for bn, bk, w, s in
                itertools.product((64, 128, 256), (64, 128), (4, 8), (1, 2, 4, 8))]
    if m > 16:  # GEMM tiles, no split (issue 25 asks batch 1-256 tuned)
        return [W4Tiles(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in
                itertools.product(sorted({min(m, 128), 64, 32}), (64, 128), (32, 64), (4, 8), (3, 4))]
    return [W4Tiles(16, bn, bk, s, w, st, lo) for bn, bk, w, st, s, lo in
            itertools.product((64, 128), (64, 128), (4,), (3, 5), (1, 2, 4, 8), (True, False))]


def make(kind: str, n: int, k: int, copies: int, device: str):
    from tandem.model.quant.fp8 import quantize_per_channel

    if kind == "gemv":
        return [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    if kind == "w8a16":
        out = []
        for i in range(copies):
            w = quantize_per_channel(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02)
            out.append(w)
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from w4a16_bench import make_weight

    ws = [make_weight(n, k, torch.bfloat16, torch.device(device), seed=i) for i in range(copies)]
    if "--layout=k" not in sys.argv:  # the words dense along N, as the engine keeps them
        return ws
    from tandem.model.quant.int4_linear import along_k

    return [along_k(w) for w in ws]


def call(kind: str, x: torch.Tensor, w, tiles):
    if kind == "gemv":
        from tandem.kernels.gemv import gemv

        return gemv(x, w, None, tiles)
    if kind == "w8a16":
        from tandem.kernels.w8a16 import w8a16_matmul

        return w8a16_matmul(x, w.weight, w.scale, None, None, tiles)
    from tandem.kernels.w4a16 import w4a16_matmul

    return w4a16_matmul(x, w, tiles)


def graph_us(fns: list) -> float:
    """Microseconds per call, each fn once per replay of one graph, best of 5 replays."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return best


def _compile(job: tuple) -> int:
    kind, name, m, tiles_list = job
    n, k = shapes(kind)[name]
    w = make(kind, n, k, 1, "cuda")[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bad = 0
    for t in tiles_list:
        try:
            call(kind, x, w, t)
        except Exception:  # noqa: BLE001 (a tile Triton cannot build is skipped in the timing too)
            bad += 1
    torch.cuda.synchronize()
    return bad


def stored(kind: str, w) -> int:
    ts = (w,) if kind == "gemv" else (w.weight, w.scale) if kind == "w8a16" else (w.qweight, w.scales, w.zeros)
    return sum(t.numel() * t.element_size() for t in ts)


_WEIGHTS: dict = {}


def weights(kind: str, name: str) -> tuple[list, list]:
    """Enough copies of the quantized and the bf16 weight to pass ROTATE_BYTES, made once per GEMM."""
    if (kind, name) not in _WEIGHTS:
        _WEIGHTS.clear()
        n, k = shapes(kind)[name]
        probe = make(kind, n, k, 1, "cuda")[0]
        copies = max(2, -(-ROTATE_BYTES // stored(kind, probe)))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                 for _ in range(max(2, -(-ROTATE_BYTES // (2 * n * k))))]
        _WEIGHTS[kind, name] = ([probe] + make(kind, n, k, copies - 1, "cuda"), dense)
    return _WEIGHTS[kind, name]


def sweep(kind: str, name: str, m: int, quick: bool) -> dict:
    from tandem.kernels import num_sms

    n, k = shapes(kind)[name]
    ws, dense = weights(kind, name)
    probe = ws[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bf16 = graph_us([lambda d=d: x @ d.t() for d in dense])
    if kind == "gemv":
        from tandem.kernels.gemv import gemv_tiles

        default = gemv_tiles(n, k, num_sms(x.device))
    elif kind == "w8a16":
        from tandem.kernels.w8a16 import w8a16_tiles

        default = w8a16_tiles(m, n, k, None, num_sms(x.device))
    else:
        from tandem.kernels.w4a16 import w4a16_tiles

        default = w4a16_tiles(m, n, k, 128, num_sms(x.device))
    grid = grid_of(kind, m)
    floor = (stored(kind, probe) + 2 * m * (n + k)) / HBM * 1e6
    results = []
    for t in ([default] + ([] if quick else grid)):
        try:
            results.append((graph_us([lambda w=w, t=t: call(kind, x, w, t) for w in ws]), t))
        except Exception as exc:  # noqa: BLE001
            print(f"  {kind} {name} m={m} {t}: {type(exc).__name__}", flush=True)
    best_us, best = min(results, key=lambda r: r[0])
    ref = (x.float() @ probe.float().t() if kind == "gemv" else
           x.float() @ probe.dequantize(torch.float32).t() if kind == "w8a16" else None)
    err = None if ref is None else ((call(kind, x, probe, best).float() - ref).norm() / ref.norm()).item()
    return {"kind": kind, "gemm": name, "m": m, "bf16_us": bf16, "default_us": results[0][0], "default": repr(default),
            "best_us": best_us, "best": repr(best), "floor_us": floor, "rel_err": err,
            "top5": [(u, repr(t)) for u, t in sorted(results, key=lambda r: r[0])[:5]]}


def fp8_paths(name: str, m: int) -> dict:
    """The FP8-activation paths at the same sizes, for comparison: the activations quantized per token,
    then the Triton FP8 GEMM (splits from the shapes, or forced) or ``torch._scaled_mm``."""
    from tandem.kernels.fp8_gemm import fp8_block_gemm
    from tandem.model.quant.fp8 import quantize_activations

    ws, _ = weights("w8a16", name)
    k = SHAPES[name][1]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

    def triton_fp8(w, split):
        xq, sa = quantize_activations(x, None, None)
        return fp8_block_gemm(xq, sa, w.weight, w.scale.view(-1, 1), (1, k), x.dtype, split_k=split)

    def scaled_mm(w):
        xq, sa = quantize_activations(x, None, None)
        return torch._scaled_mm(xq, w.weight.t(), scale_a=sa, scale_b=w.scale.view(1, -1), out_dtype=x.dtype)

    row = {f"triton_split_{s}": graph_us([lambda w=w, s=s: triton_fp8(w, s) for w in ws]) for s in (None, 1, 4, 8)}
    row["scaled_mm"] = graph_us([lambda w=w: scaled_mm(w) for w in ws])
    return row


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    args = [a for a in argv if not a.startswith("--")]
    out_dir = Path(args[0]) if args else Path(os.environ.get("OUT", "."))
    kinds = [a.split("=", 1)[1] for a in argv if a.startswith("--kind=")] or list(ROWS)
    only = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--rows=")]
    jobs = [(kind, name, m) for kind in kinds for name in shapes(kind) for m in ROWS[kind] if not only or m in only]
    if not quick:
        import multiprocessing as mp

        with ProcessPoolExecutor(12, mp_context=mp.get_context("spawn")) as pool:
            grids = [(kind, name, m, grid_of(kind, m)) for kind, name, m in jobs]
            chunks = [(kind, name, m, g[i::3]) for kind, name, m, g in grids for i in range(3)]
            print("compile failures:", sum(pool.map(_compile, chunks)), flush=True)
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, name, m in jobs:
        r = sweep(kind, name, m, quick)
        rows.append(r)
        (out_dir / "quant_tune.json").write_text(json.dumps(rows, indent=1))
        print(f"{kind} {name:<8} m={m:<3} bf16 {r['bf16_us']:7.1f}  default {r['default_us']:7.1f}  best "
              f"{r['best_us']:7.1f} ({r['floor_us'] / r['best_us']:.0%} of floor {r['floor_us']:.1f})  {r['best']}",
              flush=True)
    if "--fp8-paths" in argv:
        for name in SHAPES:
            for m in (16, 32, 64):
                row = fp8_paths(name, m)
                rows.append({"kind": "fp8_paths", "gemm": name, "m": m, **row})
                print(f"fp8 paths {name:<8} m={m:<3} " + "  ".join(f"{k} {v:6.1f}" for k, v in row.items()), flush=True)
        (out_dir / "quant_tune.json").write_text(json.dumps(rows, indent=1))
    rows = [r for r in rows if r["kind"] != "fp8_paths"]
    print("\nkind   gemm     m   bf16   default  best   floor  best/bf16")
    for r in rows:
        print(f"{r['kind']} {r['gemm']:<8} {r['m']:<3} {r['bf16_us']:6.1f} {r['default_us']:7.1f} {r['best_us']:6.1f} "
              f"{r['floor_us']:6.1f} {r['bf16_us'] / r['best_us']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
