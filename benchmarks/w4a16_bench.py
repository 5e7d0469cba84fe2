"""The W4A16 kernel on a CUDA GPU: its time against bf16 cuBLAS (``bench``) and its bf16 error,
sync-freedom and graph replay at real shapes (``check``, run by ``scripts/gpu_checks.py w4a16``).

Usage: python scripts/kernel_bench.py w4a16 [--cpu-smoke]

bench: the linear layers of Llama-3-8B (q/k/v 6144 x 4096, o 4096 x 4096, gate/up 28672 x 4096,
down 4096 x 14336), group 128 with zero points (AWQ / asymmetric GPTQ), bf16 activations, M rows.
Each time is triton.testing.do_bench's median. Columns:
  w4 us      tandem.kernels.w4a16.w4a16_matmul on the packed weights (each word loaded once)
  gather us  the same tiles loading each word once per input channel it holds (load_once=False)
  bf16 us    torch.matmul with the dequantized weights in bf16 (cuBLAS)
  speed-up   bf16 / w4
  floor us   bytes the kernel must read (packed weights, scales, zeros, x) and write (y) / 3.35e12 B/s
             (H100 SXM's HBM3); %floor = floor / w4
  rel err    w4 vs x.float() @ W.float()^T with W the same dequantized bf16 weights (the larger
             of the two unpacking paths' errors)
  tiles      w4a16_tiles for this M: block_m x block_n x block_k, split_k
The last line is ALL OK when every rel err < 1e-2 and no NaN, else FAILURES.

--cpu-smoke runs tiny float32 shapes on CPU through Triton's interpreter (timings mean nothing)."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from moe_bench import rel_err, time_us  # noqa: E402  (the same harness helpers)

HBM_BYTES_PER_S = 3.35e12
MAX_ERR = 1e-2
ROWS = (1, 8, 32, 128)
LLAMA3_8B = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))
TINY = (("tiny", 96, 256),)


def make_weight(n: int, k: int, dtype: torch.dtype, device: torch.device, group: int = 128, seed: int = 0):
    """Random 4-bit integers, zero points and scales of a [N, K] linear in the kernel's layout."""
    from tandem.model.quant.int4 import Int4Weight, pack_nibbles

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // group, n), generator=g, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 0.001
    return Int4Weight(pack_nibbles(q, 0), scales, zeros, group).to(device, dtype)


def bench_row(name: str, n: int, k: int, m: int, w, dense: torch.Tensor) -> bool:
    from tandem.kernels import num_sms
    from tandem.kernels.w4a16 import w4a16_matmul, w4a16_tiles

    device = dense.device
    x = torch.randn(m, k, dtype=dense.dtype, device=device)
    t = w4a16_tiles(m, n, k, w.group_size, num_sms(device))
    gather_tiles = replace(t, load_once=False)
    ref = x.float() @ dense.float().t()
    outs = [w4a16_matmul(x, w, t), w4a16_matmul(x, w, gather_tiles)]
    err, nan = max(rel_err(o, ref) for o in outs), any(bool(torch.isnan(o).any()) for o in outs)
    w4 = time_us(lambda: w4a16_matmul(x, w, t), device)
    gather = time_us(lambda: w4a16_matmul(x, w, gather_tiles), device)
    bf16 = time_us(lambda: x @ dense.t(), device)
    stored = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))
    floor = (stored + x.numel() * x.element_size() + m * n * x.element_size()) / HBM_BYTES_PER_S * 1e6
    tiles = f"{t.block_m}x{t.block_n}x{t.block_k} s{t.split_k}"
    print(f"{name:<8} {m:>5} {w4:>9.1f} {gather:>9.1f} {bf16:>9.1f} {bf16 / w4:>8.2f}x {floor:>8.1f} "
          f"{floor / w4:>6.1%} {err:>8.1e}{' NaN!' if nan else ''} {tiles:>16}", flush=True)
    return err < MAX_ERR and not nan


def bench(argv: list[str]) -> int:
    if "--cpu-smoke" in argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
        device, dtype, shapes, rows = torch.device("cpu"), torch.float32, TINY, (1, 17)
    else:
        device, dtype, shapes, rows = torch.device("cuda"), torch.bfloat16, LLAMA3_8B, ROWS
    from tandem.model.quant.int4 import dequantize

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"W4A16 (group 128, zero points), device {name}, {dtype}; floor at {HBM_BYTES_PER_S / 1e12:.2f} TB/s")
    print(f"{'layer':<8} {'M':>5} {'w4 us':>9} {'gather us':>9} {'bf16 us':>9} {'speed-up':>9} {'floor us':>8} "
          f"{'%floor':>6} {'rel err':>8} {'tiles':>16}")
    ok = True
    for label, n, k in shapes:
        w = make_weight(n, k, dtype, device)
        dense = dequantize(w)
        for m in rows:
            ok &= bench_row(label, n, k, m, w, dense)
        del w, dense
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


def check() -> bool:
    """bf16 at the 8B shapes: error and NaN for M from 1 to 2048 (decode, split-K, prefill tiers);
    an act-order weight (permuted input channels); no hidden sync; a CUDA graph replaying a decode
    call on new activations equals eager; the engine on 4-bit checkpoints (``engine_check``)."""
    from gpu_checks import hidden_syncs

    from tandem.kernels import num_sms
    from tandem.kernels.w4a16 import w4a16_matmul, w4a16_tiles
    from tandem.model.quant.int4 import Int4Weight, dequantize

    device, ok = torch.device("cuda"), True
    for label, n, k in LLAMA3_8B:
        w = make_weight(n, k, torch.bfloat16, device)
        dense = dequantize(w).float()
        for m in (1, 5, 16, 17, 200, 2048):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            tiles = w4a16_tiles(m, n, k, w.group_size, num_sms(device))
            for t in (tiles, replace(tiles, load_once=False)):
                out = w4a16_matmul(x, w, t)
                err, nan = rel_err(out, x.float() @ dense.t()), bool(torch.isnan(out).any())
                print(f"w4a16 {label} M={m} load_once={t.load_once}: rel err {err:.1e}{' NaN!' if nan else ''}")
                ok &= err < MAX_ERR and not nan
    perm = torch.randperm(4096, device=device)
    w = make_weight(4096, 4096, torch.bfloat16, device)
    shuffled = Int4Weight(w.qweight, w.scales, w.zeros, w.group_size, perm)
    x = torch.randn(3, 4096, dtype=torch.bfloat16, device=device)
    err = rel_err(w4a16_matmul(x, shuffled), x.float() @ dequantize(shuffled).float().t())
    print(f"w4a16 act order: rel err {err:.1e}")
    ok &= err < MAX_ERR
    syncs = hidden_syncs(lambda: w4a16_matmul(x, w))
    graph, static = torch.cuda.CUDAGraph(), torch.randn(1, 4096, dtype=torch.bfloat16, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w4a16_matmul(static, w)  # compiled off the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = w4a16_matmul(static, w)
    fresh = torch.randn(1, 4096, dtype=torch.bfloat16, device=device)
    static.copy_(fresh)
    graph.replay()
    same = torch.equal(out, w4a16_matmul(fresh, w))
    print(f"w4a16 graph replay on new activations == eager: {same}; synchronizing calls: {len(syncs)}"
          + "".join(f"\n  {s}" for s in syncs[:5]))
    return ok and same and not syncs and engine_check()


def engine_check(device: str = "cuda") -> bool:
    """The engine on CUDA (CUDA graphs, async) on a tiny Llama quantized in AWQ and GPTQ act order
    (tests/test_int4_models.py's helpers): its greedy tokens equal those of the dequantized float32
    model, in float32 (the kernel's ieee dot products)."""
    import tempfile

    from checkpoints import build_checkpoint
    from test_int4_models import PROMPTS, quantized_pair

    from tandem import LLM, SamplingParams

    root = Path(tempfile.mkdtemp())
    src, ok = build_checkpoint("llama", root / "llama"), True
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for fmt in ("awq", "gptq-act-order"):
        runs = []
        for path in quantized_pair(src, root, fmt):
            # a fixed KV cache: the kernel checks before leave memory cached, which a plan by
            # utilization would count as taken (it found no room)
            llm = LLM(str(path), device=device, dtype="float32", max_num_seqs=4, max_model_len=128,
                      kv_cache_tokens=2048)
            runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
            llm.engine.shutdown()
        print(f"w4a16 engine {fmt} (CUDA graphs, float32): tokens == dequantized model: {runs[0] == runs[1]}")
        ok &= runs[0] == runs[1]
    return ok


if __name__ == "__main__":
    sys.exit(bench(sys.argv[1:]))
