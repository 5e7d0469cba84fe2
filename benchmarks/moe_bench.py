"""The fused MoE kernel on a CUDA GPU: its time against torch and the bandwidth floor (``bench``), and
its correctness at real shapes (``check``, run by ``scripts/gpu_checks.py moe``).

Usage: python scripts/kernel_bench.py moe [--cpu-smoke] [--sweep]

bench: one MoE layer at the shapes of Qwen3-30B-A3B (H 2048, I 768, E 128, k 8) and Mixtral 8x7B
(H 4096, I 14336, E 8, k 2), bf16, random routing (a random router: close to uniform), for T tokens.
Each time is triton.testing.do_bench's median. Columns:
  experts    distinct experts this routing touches (what the kernel must read)
  fused us   tandem.kernels.fused_moe.fused_experts (alignment, two grouped GEMMs, the k-sum)
  grouped us torch: a loop over the touched experts, each one's tokens through cuBLAS GEMMs, with the
             routing split into per-expert index lists beforehand (untimed): the dense grouped
             reference without its host reads
  ref us     experts_reference, the engine's CPU path, as it runs (its per-expert host reads timed)
  floor us   bytes of the touched experts' weights (+ hidden in, out) / 3.35e12 B/s (H100 SXM's HBM3)
  %floor     floor / fused
  TFLOP/s    2 * T * k * 3 * H * I / fused: what matters once the experts are all read
  rel err    fused vs experts_reference on the same bf16 inputs
  tiles      the table's tiles for this T (moe_align.moe_blocks): block_m x block_n x block_k,
             group_m, warps, stages
The last line is ALL OK when every rel err < 1e-2 and no NaN, else FAILURES.

--sweep times each row with a set of candidate tiles instead and prints the table's tiles and the
fastest (a few minutes: every candidate compiles), for retuning ``moe_align``'s table.

--cpu-smoke runs tiny float32 shapes on CPU through Triton's interpreter (timings mean nothing)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

HBM_BYTES_PER_S = 3.35e12
MAX_ERR = 1e-2
TOKENS = (1, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


QWEN3_30B_A3B = Shape("qwen3-30b-a3b", 2048, 768, 128, 8)
MIXTRAL_8X7B = Shape("mixtral-8x7b", 4096, 14336, 8, 2)
TINY = Shape("tiny", 32, 48, 16, 4)


@dataclass
class Layer:
    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor


def make_weights(s: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device).manual_seed(0)
    w13 = torch.randn(s.experts, 2 * s.inter, s.hidden, generator=g, device=device, dtype=dtype) * s.hidden ** -0.5
    w2 = torch.randn(s.experts, s.hidden, s.inter, generator=g, device=device, dtype=dtype) * s.inter ** -0.5
    return w13, w2


def make_layer(s: Shape, tokens: int, w13: torch.Tensor, w2: torch.Tensor, seed: int = 1) -> Layer:
    from tandem.model.layers.experts import route

    g = torch.Generator(w13.device).manual_seed(seed)
    x = torch.randn(tokens, s.hidden, generator=g, device=w13.device, dtype=w13.dtype)
    weights, ids = route(torch.randn(tokens, s.experts, generator=g, device=w13.device), s.top_k, True)
    return Layer(x, w13, w2, weights, ids)


def grouped_torch(layer: Layer) -> Callable[[], torch.Tensor]:
    """The dense grouped reference: per touched expert, its tokens through two GEMMs (the routing's
    per-expert token lists computed here, outside the timed function)."""
    import torch.nn.functional as F

    flat = layer.ids.long()
    groups = [(e, *torch.nonzero(flat == e, as_tuple=True)) for e in torch.unique(flat).tolist()]
    inter = layer.w2.shape[2]

    def run() -> torch.Tensor:
        out = torch.zeros(layer.x.shape, dtype=torch.float32, device=layer.x.device)
        for e, token, slot in groups:
            gate_up = layer.x[token] @ layer.w13[e].t()
            y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ layer.w2[e].t()
            out.index_add_(0, token, y.float() * layer.weights[token, slot, None])
        return out.to(layer.x.dtype)

    return run


def time_us(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") * 1e3
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_row(s: Shape, tokens: int, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    from tandem.kernels.fused_moe import fused_experts
    from tandem.kernels.moe_align import moe_blocks
    from tandem.model.layers.experts import experts_reference

    layer = make_layer(s, tokens, w13, w2)
    args = (layer.x, w13, w2, layer.weights, layer.ids)
    out, ref = fused_experts(*args), experts_reference(*args)
    err, nan = rel_err(out, ref), bool(torch.isnan(out).any())
    device = layer.x.device
    fused, grouped, reference = (time_us(f, device) for f in (lambda: fused_experts(*args), grouped_torch(layer),
                                                               lambda: experts_reference(*args)))
    touched = int(torch.unique(layer.ids).numel())
    item = w13.element_size()
    moved = touched * 3 * s.hidden * s.inter * item + 2 * tokens * s.hidden * item
    floor = moved / HBM_BYTES_PER_S * 1e6
    tflops = 2 * tokens * s.top_k * 3 * s.hidden * s.inter / fused * 1e-6
    print(f"{s.name:<14} {tokens:>5} {touched:>7} {fused:>9.1f} {grouped:>10.1f} {reference:>9.1f} {floor:>8.1f} "
          f"{floor / fused:>6.1%} {tflops:>7.1f} {err:>8.1e} {'NaN!' if nan else 'ok':>4} "
          f"{tiles_text(moe_blocks(tokens, s.top_k, s.experts))}", flush=True)
    return err < MAX_ERR and not nan


def tiles_text(b) -> str:
    return f"{b.block_m}x{b.block_n}x{b.block_k} g{b.group_m} w{b.num_warps} s{b.num_stages}"


def sweep_row(s: Shape, tokens: int, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """The table's tiles against candidates, each checked against the reference before it is timed."""
    from tandem.kernels.fused_moe import fused_experts
    from tandem.kernels.moe_align import MoEBlocks, moe_blocks
    from tandem.model.layers.experts import experts_reference

    layer = make_layer(s, tokens, w13, w2)
    args = (layer.x, w13, w2, layer.weights, layer.ids)
    ref = experts_reference(*args)
    table = moe_blocks(tokens, s.top_k, s.experts)
    candidates = {table} | {MoEBlocks(*c) for c in SWEEP}
    times = {}
    for blocks in candidates:
        if rel_err(fused_experts(*args, blocks=blocks), ref) > MAX_ERR:
            print(f"  {tiles_text(blocks)}: wrong result", flush=True)
            return False
        times[blocks] = time_us(lambda: fused_experts(*args, blocks=blocks), layer.x.device)
    best = min(times, key=times.get)
    print(f"{s.name:<14} {tokens:>5} table {tiles_text(table):<20} {times[table]:>9.1f} us   best "
          f"{tiles_text(best):<20} {times[best]:>9.1f} us", flush=True)
    return True


# (block_m, block_n, block_k, group_m, num_warps, num_stages) tried by --sweep
SWEEP = [(16, 32, 128, 1, 4, 4), (16, 64, 64, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 128, 64, 1, 4, 3),
         (32, 64, 64, 4, 4, 4), (32, 128, 64, 4, 4, 3), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3),
         (64, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3)]


def bench(argv: list[str]) -> int:
    smoke = "--cpu-smoke" in argv
    row = sweep_row if "--sweep" in argv else bench_row
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
        device, dtype, plan = torch.device("cpu"), torch.float32, [(TINY, (1, 64))]
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        plan = [(QWEN3_30B_A3B, TOKENS), (MIXTRAL_8X7B, TOKENS)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"MoE layer, device {name}, {dtype}; floor at {HBM_BYTES_PER_S / 1e12:.2f} TB/s")
    if row is bench_row:
        print(f"{'model':<14} {'T':>5} {'experts':>7} {'fused us':>9} {'grouped us':>10} {'ref us':>9} "
              f"{'floor us':>8} {'%floor':>6} {'TFLOP/s':>7} {'rel err':>8} {'NaN':>4} tiles")
    ok = True
    for shape, token_counts in plan:
        w13, w2 = make_weights(shape, dtype, device)
        for tokens in token_counts:
            ok &= row(shape, tokens, w13, w2)
        del w13, w2
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


def check() -> bool:
    """bf16 at real shapes on CUDA: the kernel vs the reference (error, NaN), the entry point models
    call takes the kernel, no hidden sync, a CUDA graph replays it with new routing, and its peak
    allocation stays within the memory plan's workspace; then FP8 and 4-bit experts against the
    reference that dequantizes each expert, with their times against bf16."""
    from gpu_checks import hidden_syncs

    from tandem.kernels.fused_moe import fused_experts
    from tandem.kernels.moe_align import workspace_bytes
    from tandem.model.layers.experts import experts, experts_reference, use_fused_kernel

    device, ok = torch.device("cuda"), use_fused_kernel(torch.device("cuda"))
    for s, token_counts in ((QWEN3_30B_A3B, (1, 64, 512, 4096)), (MIXTRAL_8X7B, (16, 1024))):
        w13, w2 = make_weights(s, torch.bfloat16, device)
        for tokens in token_counts:
            layer = make_layer(s, tokens, w13, w2)
            args = (layer.x, w13, w2, layer.weights, layer.ids)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = experts(*args)
            peak = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
            plan = workspace_bytes(tokens, s.top_k, s.experts, s.hidden, s.inter, 2)
            err, nan = rel_err(out, experts_reference(*args)), bool(torch.isnan(out).any())
            print(f"moe {s.name} T={tokens}: rel err {err:.1e}{' NaN!' if nan else ''}, workspace peak "
                  f"{peak / 2**20:.1f} MiB (plan {plan / 2**20:.1f} MiB)")
            ok &= err < MAX_ERR and not nan and peak <= plan
        del w13, w2
        torch.cuda.empty_cache()
    # every part runs and prints, whichever fails
    parts = [_fp8_check(fused_experts, experts_reference), _int4_check(fused_experts, experts_reference),
             _graph_and_sync_check(fused_experts, hidden_syncs)]
    return ok and all(parts)


def random_fp8_experts(e: int, n: int, k: int, block: tuple[int, int], device: torch.device):
    """Random FP8 experts with a positive random scale grid (never all equal: each block's scale matters)."""
    from tandem.model.quant.fp8 import FP8
    from tandem.model.quant.fp8_experts import Fp8Experts

    weight = (torch.randn(e, n, k, device=device) * 2).to(FP8)
    grid = (e, -(-n // block[0]), -(-k // block[1]))
    return Fp8Experts(weight, torch.rand(grid, device=device) * 0.01 + 0.002, block)


def _fp8_check(fused_experts, experts_reference, s: Shape = QWEN3_30B_A3B, device: str = "cuda") -> bool:
    """FP8 experts (per channel, and 128 x 128 blocks) at Qwen3's shapes: the kernel, which dequantizes
    FP8 tiles in registers, against the reference that dequantizes each expert, and its time against
    the same experts in bf16 (half the bytes to read)."""
    device, ok = torch.device(device), True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's math is float32
    for block in ((1, s.hidden), (128, 128) if s.inter % 128 == 0 else (16, 16)):
        w13 = random_fp8_experts(s.experts, 2 * s.inter, s.hidden, block, device)
        w2 = random_fp8_experts(s.experts, s.hidden, s.inter, (1, s.inter) if block[0] == 1 else block, device)
        ok &= _quantized_rows(f"fp8 {list(block)}", fused_experts, experts_reference, s, w13, w2, dtype)
        del w13, w2
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok


def random_int4_experts(e: int, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device):
    """Random symmetric 4-bit experts [E, N, K]: random packed words, positive random group scales."""
    from tandem.model.quant.int4_experts import Int4Experts

    words = torch.randint(-2 ** 31, 2 ** 31, (e, k // 8, n), dtype=torch.int32, device=device)
    return Int4Experts(words, (torch.rand(e, k // group, n, device=device) * 0.01 + 0.002).to(dtype), None, group)


def _int4_check(fused_experts, experts_reference, s: Shape = QWEN3_30B_A3B, device: str = "cuda") -> bool:
    """4-bit experts (symmetric, group 128; 16 where the tiny shape's widths are not multiples of
    128) at Qwen3's shapes: the kernel, which unpacks and dequantizes 4-bit tiles in registers,
    against the reference that dequantizes each expert, and its time against the same experts in
    bf16 (a quarter of the bytes to read, plus the scales)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's math is float32
    group = 128 if s.hidden % 128 == 0 and s.inter % 128 == 0 else 16
    w13 = random_int4_experts(s.experts, 2 * s.inter, s.hidden, group, dtype, device)
    w2 = random_int4_experts(s.experts, s.hidden, s.inter, group, dtype, device)
    return _quantized_rows(f"int4 group {group}", fused_experts, experts_reference, s, w13, w2, dtype)


def _quantized_rows(what: str, fused_experts, experts_reference, s: Shape, w13, w2, dtype: torch.dtype) -> bool:
    """For 1, 64 and 512 tokens: the kernel on quantized experts vs the reference that dequantizes
    each expert (rel err < MAX_ERR, no NaN), and its time against the same experts dequantized."""
    dense13, dense2, ok = w13.dequantize(dtype), w2.dequantize(dtype), True
    for tokens in (1, 64, 512):
        layer = make_layer(s, tokens, dense13, dense2)
        out = fused_experts(layer.x, w13, w2, layer.weights, layer.ids)
        err = rel_err(out, experts_reference(layer.x, w13, w2, layer.weights, layer.ids))
        nan = bool(torch.isnan(out).any())
        quant_us = time_us(lambda: fused_experts(layer.x, w13, w2, layer.weights, layer.ids), dense13.device)
        dense_us = time_us(lambda: fused_experts(layer.x, dense13, dense2, layer.weights, layer.ids), dense13.device)
        print(f"moe {what} T={tokens}: rel err {err:.1e}{' NaN!' if nan else ''}, {quant_us:.1f} us vs "
              f"{str(dtype).removeprefix('torch.')} {dense_us:.1f} us ({dense_us / quant_us:.2f}x)")
        ok &= err < MAX_ERR and not nan
    return ok


def _graph_and_sync_check(fused_experts, hidden_syncs) -> bool:
    """A decode-sized call captured once, replayed on new hidden states and routing, equals eager."""
    s, tokens = QWEN3_30B_A3B, 64
    w13, w2 = make_weights(s, torch.bfloat16, torch.device("cuda"))
    static = make_layer(s, tokens, w13, w2, seed=1)
    args = (static.x, w13, w2, static.weights, static.ids)
    syncs = hidden_syncs(lambda: fused_experts(*args))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_experts(*args)  # warm-up off the capture (Triton compiles here)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(*args)
    fresh = make_layer(s, tokens, w13, w2, seed=2)
    static.x.copy_(fresh.x)
    static.weights.copy_(fresh.weights)
    static.ids.copy_(fresh.ids)
    graph.replay()
    same = torch.equal(out, fused_experts(fresh.x, w13, w2, fresh.weights, fresh.ids))
    print(f"moe graph replay with new routing == eager: {same}; synchronizing calls: {len(syncs)}"
          + "".join(f"\n  {m}" for m in syncs[:5]))
    return same and not syncs


if __name__ == "__main__":
    sys.exit(bench(sys.argv[1:]))
