"""Top-k/top-p cutoff on CUDA: the torch sort definition vs the Triton radix search and variants of
it (block width, warps, per-block sums). Usage: python3 scripts/cutoff_bench.py (a GPU; about a minute)."""
import importlib.util
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, ".")
from tandem.worker.sampler import top_k_top_p_cutoff  # noqa: E402

SRC = Path("tandem/kernels/top_k_top_p.py").read_text()
# the per-block-sum variant: each block's [BLOCK, 16] comparisons reduced at once, not accumulated
PER_BLOCK_SUM = (
    ("acc = tl.zeros([BLOCK, 16], tl.float32)", "total = tl.zeros([16], tl.float32)"),
    ("acc += tl.where(key[:, None] >= candidates[None, :], w[:, None], 0.0)",
     "total += tl.sum(tl.where(key[:, None] >= candidates[None, :], w[:, None], 0.0), axis=0)"),
    ("reached = tl.sum(acc, axis=0) >= need", "reached = total >= need"),
)
assert all(old in SRC for old, _ in PER_BLOCK_SUM)


def variant(name, block, warps, per_block_sum):
    src = SRC.replace("_BLOCK = 256", f"_BLOCK = {block}").replace("_NUM_WARPS = 8", f"_NUM_WARPS = {warps}")
    for old, new in PER_BLOCK_SUM if per_block_sum else ():
        src = src.replace(old, new)
    path = Path(f"/tmp/cutoff_{name}.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"cutoff_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fused_cutoff


g = torch.Generator(device="cuda").manual_seed(0)
V = 128256
print("| rows | case | sort (torch) us | " + " | ".join(["r256w8", "s1024w8", "s2048w8", "s1024w4", "s4096w16"]) + " |")
variants = [variant("a", 256, 8, False), variant("b", 1024, 8, True), variant("c", 2048, 8, True),
            variant("d", 1024, 4, True), variant("e", 4096, 16, True)]
for n in (32, 256, 1024):
    logits = (torch.randn(n, V, device="cuda", generator=g) * 3).bfloat16()
    t = torch.rand(n, device="cuda", generator=g) + 0.3
    for case in ("top-p 0.9", "top-k 50", "top-k 50 + top-p 0.9"):
        top_k = torch.full((n,), 50 if "top-k" in case else 0, device="cuda", dtype=torch.int64)
        top_p = torch.full((n,), 0.9 if "top-p" in case else 1.0, device="cuda")
        ref = top_k_top_p_cutoff(logits, t, top_k, top_p)
        cells = [f"{triton.testing.do_bench(lambda: top_k_top_p_cutoff(logits, t, top_k, top_p)) * 1e3:.0f}"]
        for fn in variants:
            got = fn(logits, t, top_k, top_p)
            ok = int((got == ref).sum().item())
            us = triton.testing.do_bench(lambda: fn(logits, t, top_k, top_p)) * 1e3
            cells.append(f"{us:.0f}{'' if ok == n else f' ({n - ok} differ)'}")
        print(f"| {n} | {case} | " + " | ".join(cells) + " |", flush=True)
