"""Paged attention kernels on a CUDA GPU: time, bandwidth floor and error, one table.

Usage: python scripts/kernel_bench.py [--no-flex] [--cpu-smoke]
       python scripts/kernel_bench.py moe [--cpu-smoke]   (the fused MoE kernel: scripts/moe_bench.py)
       python scripts/kernel_bench.py w4a16 [--cpu-smoke] (4-bit weights vs bf16 cuBLAS: scripts/w4a16_bench.py)

For Llama-3-8B and Llama-3.2-1B attention shapes (page 16, bf16), each row times one kernel with
triton.testing.do_bench (median) on one case: the varlen kernel on a mixed step and on a pure
prefill; on decode batches the decode kernel without splits ("decode"), with the splits that
decode_num_splits picks for this GPU ("splitN", where it picks more than one), and the varlen
kernel for comparison. The comparison columns belong to the case and repeat on its rows. Columns:
  kernel us  the Triton kernel
  floor us   bytes it must move (K/V of every context + q + out) / copy bandwidth, measured here
             with a large device-to-device copy; % floor = floor / kernel
  TFLOP/s    attention FLOPs (causal pairs only) / kernel time: the ceiling that matters for prefill
  ref us     the engine's gather + SDPA backend on the same step (n/a where it would not fit)
  flex us    torch's FlexAttention over the same pages (block mask built from the block tables,
             one sparse key block per page, so 16-key tiles; compiled; includes padding q per
             sequence and unpadding out); n/a if it fails, "bad" if it disagrees with the reference
  rel err    vs a float64 reference (gather + SDPA per sequence, tests/test_triton_varlen.py)
The last line is ALL OK when every kernel has rel err < 1e-2 and no NaN, else FAILURES.

--cpu-smoke runs tiny float32 shapes on CPU through Triton's interpreter to check the harness
itself (timings there mean nothing)."""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PAGE = 16
MAX_ERR = 1e-2


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    kv_heads: int
    head_dim: int


LLAMA3_8B = Model("llama3-8b", 32, 8, 128)
LLAMA32_1B = Model("llama3.2-1b", 32, 8, 64)
TINY = Model("tiny", 4, 2, 16)


@dataclass(frozen=True)
class Case:
    label: str
    model: Model
    chunks: tuple[tuple[int, int], ...]  # (q_len, seq_len) per sequence: the chunk is its last q_len positions
    kernels: tuple[int | None, ...] = (None,)  # a row each: None the varlen kernel, n the decode kernel, n splits


@dataclass
class Inputs:
    q: torch.Tensor
    cache: torch.Tensor
    block_tables: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    max_q: int
    scale: float


def gpu_cases(num_sms: int) -> list[Case]:
    from tandem.kernels.paged_decode import decode_num_splits

    rng = random.Random(0)
    cases = []
    for model in (LLAMA3_8B, LLAMA32_1B):
        # 8 prefill chunks of 512 (first to fourth chunk of their prompts) beside 248 decode tokens
        mixed = [(512, 512 * (1 + i % 4)) for i in range(8)] + [(1, rng.randint(1536, 2560)) for _ in range(248)]
        cases += [Case("mixed 8x512 + 248 decode", model, tuple(mixed)),
                  Case("prefill 4096", model, ((4096, 4096),))]
        for batch, ctx in ((256, 512), (32, 1024), (1, 32768), (2, 32768), (4, 32768), (8, 32768)):
            splits = decode_num_splits(batch, model.kv_heads, ctx, num_sms)
            kernels = (1, splits, None) if splits > 1 else (1, None)
            cases.append(Case(f"decode B={batch} ctx={ctx}", model, ((1, ctx),) * batch, kernels))
    return cases


def smoke_cases() -> list[Case]:
    mixed = ((5, 20), (1, 9), (0, 1), (3, 3), (20, 70))
    return [Case("mixed", TINY, mixed), Case("decode", TINY, ((1, 40), (1, 300), (1, 7)), (1, 3, None))]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device) -> Inputs:
    from test_triton_varlen import make_paged_cache

    torch.manual_seed(0)
    q_lens, seq_lens = zip(*case.chunks)
    m = case.model
    cache, block_tables = make_paged_cache(list(seq_lens), PAGE, m.kv_heads, m.head_dim, dtype, device)
    query_start = torch.tensor([0, *q_lens], device=device).cumsum(0)
    q = torch.randn(sum(q_lens), m.heads, m.head_dim, dtype=dtype, device=device)
    return Inputs(q, cache, block_tables, query_start, torch.tensor(seq_lens, device=device), max(q_lens),
                  m.head_dim ** -0.5)


def kernel_fn(num_splits: int | None, x: Inputs) -> Callable[[], torch.Tensor]:
    from tandem.kernels.paged_decode import paged_decode_attention
    from tandem.kernels.paged_varlen import paged_varlen_attention

    if num_splits is None:
        return lambda: paged_varlen_attention(x.q, x.cache, x.block_tables, x.query_start, x.seq_lens, PAGE,
                                              x.scale, None, x.max_q)
    return lambda: paged_decode_attention(x.q, x.cache, x.block_tables, x.seq_lens, PAGE, x.scale,
                                          num_splits=num_splits)


def sdpa_fn(case: Case, x: Inputs) -> Callable[[], torch.Tensor] | None:
    """The engine's gather + SDPA backend, or None where its padded tensors would not fit."""
    from tandem.model.attention.base import AttentionInputs
    from tandem.model.attention.base import AttentionSpec
    from tandem.model.attention.sdpa import SdpaBackend

    m, n_seqs = case.model, len(case.chunks)
    max_k = x.block_tables.shape[1] * PAGE
    elem = x.q.element_size()
    group = m.heads // m.kv_heads
    need = n_seqs * (x.max_q * m.heads * m.head_dim * elem + 2 * max_k * m.kv_heads * m.head_dim * elem
                     + group * x.max_q * max_k * (1 + elem))  # q_pad, gathered K/V, mask and its float form
    if x.q.is_cuda and need > 0.5 * torch.cuda.mem_get_info()[0]:
        return None
    positions = torch.cat([torch.arange(n - q, n) for q, n in case.chunks]).to(x.q.device)
    inputs = AttentionInputs(torch.zeros_like(positions), x.block_tables, x.query_start, x.seq_lens, positions,
                             x.max_q, PAGE)
    backend = SdpaBackend()
    meta, spec = backend.prepare(inputs), AttentionSpec(x.scale)
    return lambda: backend.attend(x.q, x.cache, meta, spec)


def flex_fn(case: Case, x: Inputs) -> Callable[[], torch.Tensor]:
    """FlexAttention reading the paged cache in place: the cache is one [1, Hkv, slots, D] 'batch',
    each key block is one page, and a sequence's query blocks list its pages up to their causal end."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    q_block = 128
    n_seqs, n_tokens = len(case.chunks), x.q.shape[0]
    device = x.q.device
    q_lens = torch.tensor([q for q, _ in case.chunks], device=device)
    context = x.seq_lens - q_lens
    token_seq = torch.repeat_interleave(torch.arange(n_seqs, device=device), q_lens)
    token_row = torch.arange(n_tokens, device=device) - x.query_start[token_seq]
    first = torch.arange(0, x.max_q, q_block, device=device)
    last = torch.minimum(first[None] + q_block, q_lens[:, None]) - 1
    kv_num = torch.where(first[None] < q_lens[:, None], (context[:, None] + last + PAGE) // PAGE, 0)
    n_pages = x.cache.shape[1] // PAGE
    # BlockMask wants one column per key block of the whole cache; only the first kv_num are read.
    kv_indices = torch.zeros(n_seqs, 1, first.numel(), n_pages, dtype=torch.int32, device=device)
    kv_indices[..., :x.block_tables.shape[1]] = x.block_tables[:, None, None, :].int()
    # Each page's owner and logical index: the mask must hold on its own, as eager flex ignores the
    # block list. Padding columns all name page 0, which no mask lets through.
    page_owner = torch.full((n_pages,), -1, dtype=torch.long, device=device)
    page_logical = torch.zeros(n_pages, dtype=torch.long, device=device)
    width = x.block_tables.shape[1]
    page_owner[x.block_tables.flatten()] = torch.arange(n_seqs, device=device).repeat_interleave(width)
    page_logical[x.block_tables.flatten()] = torch.arange(width, device=device).repeat(n_seqs)
    page_owner[0] = -1

    def causal(b, h, q_idx, kv_idx):
        key = page_logical[kv_idx // PAGE] * PAGE + kv_idx % PAGE
        return (page_owner[kv_idx // PAGE] == b) & (key <= context[b] + q_idx)

    block_mask = BlockMask.from_kv_blocks(kv_num[:, None].int(), kv_indices,
                                          BLOCK_SIZE=(q_block, PAGE), mask_mod=causal,
                                          seq_lengths=(x.max_q, x.cache.shape[1]))
    k, v = (x.cache[i].permute(1, 0, 2).unsqueeze(0) for i in (0, 1))
    if x.q.is_cuda:
        # Every case is a new shape and new captured tensors: without room to recompile, dynamo
        # would fall back to eager flex, which materialises all scores.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    attend = torch.compile(flex_attention, dynamic=False) if x.q.is_cuda else flex_attention

    def run() -> torch.Tensor:
        q_pad = x.q.new_zeros(n_seqs, x.max_q, *x.q.shape[1:])
        q_pad[token_seq, token_row] = x.q
        out = attend(q_pad.transpose(1, 2), k, v, block_mask=block_mask, scale=x.scale, enable_gqa=True,
                     kernel_options={"BLOCK_N": PAGE})  # a key tile may not span more than one sparse block
        return out.transpose(1, 2)[token_seq, token_row].reshape(n_tokens, -1)

    return run


def time_us(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median") * 1e3
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e6


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second that a large device-to-device copy moves (read + write)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (time_us(lambda: dst.copy_(src), device) * 1e-6)


def traffic(case: Case, elem: int) -> tuple[int, int]:
    """(bytes every kernel must move, attention FLOPs over causal pairs) of a case."""
    m = case.model
    pairs = sum(q * (n - q) + q * (q + 1) // 2 for q, n in case.chunks)
    kv = sum(n for q, n in case.chunks if q) * 2 * m.kv_heads * m.head_dim * elem
    q_out = 2 * sum(q for q, _ in case.chunks) * m.heads * m.head_dim * elem
    return kv + q_out, 4 * pairs * m.heads * m.head_dim


def optional_us(build: Callable[[], Callable[[], torch.Tensor] | None], ref: torch.Tensor, device: torch.device) -> str:
    """Time of a comparison path, 'n/a' if it cannot run here, 'bad' if it disagrees with the reference."""
    from test_triton_varlen import rel_err

    try:
        fn = build()
        if fn is None:
            return "n/a"
        if rel_err(fn(), ref) > MAX_ERR:
            return "bad"
        return f"{time_us(fn, device):.0f}"
    except Exception as e:  # noqa: BLE001 - any failure of a comparison path is reported, not fatal
        print(f"  ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})", file=sys.stderr)
        return "n/a"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_case(case: Case, dtype: torch.dtype, device: torch.device, bandwidth: float, flex: bool) -> bool:
    """Prints a row per kernel of the case; returns whether all of them passed."""
    from test_triton_varlen import reference_attention, rel_err

    x = make_inputs(case, dtype, device)
    ref = reference_attention(x.q.double(), x.cache, x.block_tables, x.query_start, x.seq_lens, PAGE, x.scale, None)
    ref_us = optional_us(lambda: sdpa_fn(case, x), ref, device)
    flex_us = optional_us(lambda: flex_fn(case, x), ref, device) if flex else "off"
    moved, flops = traffic(case, x.q.element_size())
    floor = moved / bandwidth * 1e6
    ok = True
    for num_splits in case.kernels:
        fn = kernel_fn(num_splits, x)
        out = fn()
        err, has_nan = rel_err(out, ref), bool(torch.isnan(out).any())
        kernel = time_us(fn, device)
        name = "varlen" if num_splits is None else "decode" if num_splits == 1 else f"split{num_splits}"
        print(f"{case.model.name:<12} {name:<7} {case.label:<26} {kernel:>9.1f} {floor:>8.1f} {floor / kernel:>6.1%} "
              f"{flops / kernel * 1e-6:>7.1f} {ref_us:>8} {flex_us:>8} {err:>8.1e} {'NaN!' if has_nan else 'ok':>4}",
              flush=True)
        ok &= err < MAX_ERR and not has_nan
    return ok


def main(argv: list[str]) -> int:
    if argv[:1] == ["moe"]:
        from moe_bench import bench

        return bench(argv[1:])
    if argv[:1] == ["w4a16"]:
        from w4a16_bench import bench as w4a16_bench

        return w4a16_bench(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take minutes)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny float32 shapes on CPU, Triton interpreted")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
        device, dtype, cases = torch.device("cpu"), torch.float32, smoke_cases()
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        cases = gpu_cases(torch.cuda.get_device_properties(device).multi_processor_count)
    bandwidth = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}, page {PAGE}, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'model':<12} {'kernel':<7} {'case':<26} {'kernel us':>9} {'floor us':>8} {'%floor':>6} {'TFLOP/s':>7} "
          f"{'ref us':>8} {'flex us':>8} {'rel err':>8} {'NaN':>4}")
    ok = True
    for case in cases:
        ok &= bench_case(case, dtype, device, bandwidth, not args.no_flex)
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
