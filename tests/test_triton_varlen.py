"""The paged varlen kernel and the split-KV decode path against a reference written here from the
definition, on CPU through Triton's interpreter (float32, tiny shapes). Each check runs in a
subprocess so that TRITON_INTERPRET is set before Triton is imported.

The reference and the cache builder are plain functions of this module: the subprocess scripts
import them, and so does scripts/kernel_bench.py for its float64 error column."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Checked without importing it here: Triton's extension prints leak warnings at interpreter exit.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (the test extra installs it)")


def make_paged_cache(seq_lens: list[int], page_size: int, kv_heads: int, head_dim: int,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache full of random values (so a kernel reading a wrong slot gets garbage, never zeros) and
    block tables that hand each sequence shuffled pages, never page 0, padded with 0 plus one spare
    column, as graph-captured steps have. Uses torch's global generator: seed it first."""
    n_pages = [-(-n // page_size) for n in seq_lens]
    total = 1 + sum(n_pages) + 2  # the dummy page 0, the sequences' pages, and two nobody owns
    cache = torch.randn(2, total * page_size, kv_heads, head_dim, dtype=dtype, device=device)
    free = (torch.randperm(total - 1) + 1).tolist()
    width = max(n_pages, default=0) + 1
    tables = torch.zeros(len(seq_lens), width, dtype=torch.long)
    for b, n in enumerate(n_pages):
        tables[b, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.long)
    return cache, tables.to(device)


def reference_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        query_start: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
                        sliding_window: int | None) -> torch.Tensor:
    """Per sequence: gather its keys from the pages, then dense SDPA in q's dtype with a causal
    (+ window) mask at absolute positions; a chunk's queries are the sequence's last positions."""
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // cache.shape[2]
    out = q.new_zeros(n_tokens, n_heads * head_dim)
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for b, n_keys in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if start == end:
            continue
        keys = torch.arange(n_keys, device=q.device)
        slots = block_tables[b, keys // page_size] * page_size + keys % page_size
        k, v = (cache[i, slots].to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1) for i in (0, 1))
        pos = n_keys - (end - start) + torch.arange(end - start, device=q.device)
        window = n_keys + 1 if sliding_window is None else sliding_window
        ahead = pos[:, None] - keys[None, :]
        visible = (ahead >= 0) & (ahead < window)
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k, v, attn_mask=visible, scale=scale)
        out[start:end] = o.transpose(0, 1).reshape(end - start, -1)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


VARLEN = r"""
import itertools, torch
from test_triton_varlen import make_paged_cache, reference_attention, rel_err
from tandem.kernels.paged_varlen import paged_varlen_attention

def check(seed, hq, hkv, d, page, chunks, window, extra_q=0, strided=False):
    # chunks: (q_len, seq_len) per sequence; the chunk is the sequence's last q_len positions.
    torch.manual_seed(seed)
    q_lens, lens = [c[0] for c in chunks], [c[1] for c in chunks]
    cache, bt = make_paged_cache(lens, page, hkv, d)
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)])
    n = int(query_start[-1])
    # strided: q as a view of a fused qkv projection, as the model passes it
    q = torch.randn(n, hq + 2 * hkv, d)[:, :hq] if strided else torch.randn(n, hq, d)
    seq_lens = torch.tensor(lens)
    args = (cache, bt, query_start, seq_lens, page, d ** -0.5, window)
    out = paged_varlen_attention(q, *args, max_q=max(q_lens) + extra_q)
    err = rel_err(out, reference_attention(q, *args))
    assert err < 1e-5 and not out.isnan().any(), (seed, hq, hkv, d, page, chunks, window, err)
    return err

errs = [
    # group 4: decode tokens, first chunks, later chunks, a padding row, a chunk over 3 tiles
    check(0, 8, 2, 16, 3, [(1, 1), (1, 40), (7, 7), (5, 33), (0, 1), (37, 100), (1, 200)], None, strided=True),
    # group 1, one-slot pages, window; a first chunk longer than one tile
    check(1, 2, 2, 24, 1, [(70, 70), (1, 30), (9, 50), (0, 1)], 6),
    # group 3 (rows not a multiple of it), window across key blocks
    check(2, 6, 2, 24, 16, [(20, 150), (1, 17), (13, 13), (2, 65), (30, 200)], 40),
    # group 2, head_dim 80 (padded to 128), 32-slot pages
    check(3, 4, 2, 80, 32, [(33, 33), (1, 130), (16, 96)], None),
    # group 4 over one KV head, head_dim 64, window narrower than the chunk, 5-slot pages
    check(4, 4, 1, 64, 5, [(40, 300), (1, 2), (3, 70)], 33),
    # only short chunks (small tiles); max_q larger than any chunk, as a captured graph may pass
    check(5, 8, 2, 16, 16, [(1, 5), (2, 40), (0, 1), (1, 100)], None, extra_q=3),
    # tiles straddling a key-block edge (the diagonal), and a window wide enough for mask-free blocks
    check(6, 8, 2, 16, 7, [(40, 90), (64, 64), (1, 65)], None),
    check(7, 4, 2, 24, 16, [(40, 430), (1, 333), (3, 3)], 150),
]
print("max rel err", max(errs))
"""

DECODE = r"""
import torch
from test_triton_varlen import make_paged_cache, reference_attention, rel_err
from tandem.kernels.paged_decode import decode_num_splits, paged_decode_attention

def check(seed, hq, hkv, d, page, lens, window, splits):
    torch.manual_seed(seed)
    cache, bt = make_paged_cache(lens, page, hkv, d)
    q, seq_lens = torch.randn(len(lens), hq, d), torch.tensor(lens)
    ref = reference_attention(q, cache, bt, torch.arange(len(lens) + 1), seq_lens, page, d ** -0.5, window)
    errs = []
    for n in splits:
        out = paged_decode_attention(q, cache, bt, seq_lens, page, d ** -0.5, window, num_splits=n)
        errs.append(rel_err(out, ref))
        assert errs[-1] < 1e-5 and not out.isnan().any(), (seed, hq, hkv, d, page, lens, window, n, errs[-1])
    return max(errs)

errs = [
    # short sequences leave most splits empty (a share is at least 256 keys); 1000 keys use 2 to 4
    check(10, 8, 2, 16, 16, [1, 7, 64, 65, 300, 1000], None, [1, 2, 3, 8]),
    check(11, 6, 2, 24, 3, [1, 50, 129, 700], 20, [1, 4]),  # group 3, window inside one split
    check(12, 4, 4, 64, 1, [5, 600], 300, [1, 3]),  # window spanning split boundaries
    check(13, 4, 1, 80, 32, [900], None, [1, 2, 64]),  # far more splits than the sequence needs
]
assert decode_num_splits(256, 8, 512, 132) == 1  # B x Hkv already fills the GPU
assert decode_num_splits(4, 8, 128, 132) == 1  # contexts too short to share out
wide = [decode_num_splits(b, 8, 32768, 132) for b in (1, 2, 4, 8)]
assert all(n > 1 and n & (n - 1) == 0 for n in wide) and wide == sorted(wide, reverse=True), wide
print("max rel err", max(errs), "splits", wide)
"""

SOFTCAP = r"""
import itertools, torch
from test_triton_varlen import make_paged_cache, rel_err
from tandem.kernels.paged_decode import paged_decode_attention
from tandem.kernels.paged_varlen import paged_varlen_attention
from tandem.model.attention import AttentionInputs
from tandem.model.attention.base import AttentionSpec
from tandem.model.attention.sdpa import SdpaBackend

def check(seed, hq, hkv, d, page, chunks, window, cap, splits=()):
    # Soft-capped scores (Gemma 2) through both kernels against the SDPA backend's capped path, with
    # scores of several units so that the cap bends them; the uncapped kernel must differ.
    torch.manual_seed(seed)
    q_lens, lens = [c[0] for c in chunks], [c[1] for c in chunks]
    cache, bt = make_paged_cache(lens, page, hkv, d)
    cache *= 3
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)])
    positions = torch.cat([torch.arange(n - m, n) for m, n in zip(q_lens, lens)])
    q, seq_lens = 3 * torch.randn(len(positions), hq, d), torch.tensor(lens)
    spec = AttentionSpec(0.8 * d ** -0.5, window, cap)
    sdpa = SdpaBackend()
    inputs = AttentionInputs(torch.zeros(len(positions), dtype=torch.long), bt, query_start, seq_lens, positions,
                             max(q_lens), page)
    ref = sdpa.attend(q, cache, sdpa.prepare(inputs), spec)
    args = (cache, bt, query_start, seq_lens, page, spec.scale, window, max(q_lens))
    errs = [rel_err(paged_varlen_attention(q, *args, softcap=cap), ref)]
    uncapped = rel_err(paged_varlen_attention(q, *args), ref)
    for n in splits:  # decode steps (one token per sequence): the decode kernel too, split or not
        out = paged_decode_attention(q, cache, bt, seq_lens, page, spec.scale, window, num_splits=n, softcap=cap)
        errs.append(rel_err(out, ref))
    assert max(errs) < 1e-5 and uncapped > 1e-2, (seed, hq, hkv, d, page, chunks, window, cap, errs, uncapped)
    return max(errs)

errs = [
    # group 4, window 6, one-token and longer chunks over cached context, 3-slot pages
    check(20, 8, 2, 16, 3, [(1, 1), (1, 40), (7, 7), (5, 33), (37, 100)], 6, 5.0),
    # group 1, no window, a first chunk over two tiles, one-slot pages, a mild cap
    check(21, 2, 2, 24, 1, [(70, 70), (9, 50)], None, 20.0),
    # group 3 (rows not a multiple of it), window across key blocks with mask-free blocks inside, Gemma 2's cap
    check(22, 6, 2, 24, 16, [(20, 150), (40, 430), (13, 13)], 150, 50.0),
    # decode steps: windows inside and across split shares, GQA 2 and 4
    check(23, 4, 2, 32, 8, [(1, 5), (1, 300), (1, 700), (1, 1)], None, 10.0, splits=(1, 4)),
    check(24, 8, 2, 16, 4, [(1, 600), (1, 37), (1, 1000)], 300, 30.0, splits=(1, 3)),
]
print("max rel err", max(errs))
"""


def _run_interpreted(script: str) -> str:
    root = Path(__file__).parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script", [VARLEN, DECODE, SOFTCAP], ids=["varlen", "decode_split_kv", "softcap"])
def test_paged_kernels_match_reference(script: str) -> None:
    assert "max rel err" in _run_interpreted(script)
