"""Token sampling in one pass over each row (shared out over a few programs), with memory O(rows)
instead of O(rows x vocab).

The draw is the exponential race written in log space (Gumbel-max): among the eligible tokens take
the argmax of ``x_i - log(-log u_i)``, where ``x = logits / temperature`` and ``u`` is the
counter-based noise of ``uniform_noise`` below (a hash of seed, output index and
token id). That draws token i with probability softmax(x)_i restricted to the eligible set, and a
seeded request draws the same tokens whatever else shares its batch.

Per-row controls, shared by ``fused_sample`` (the Triton kernel) and ``sample_reference`` (torch):

* ``temperature == 0``: greedy, the argmax of the raw logits; cutoff and min_p do not apply.
* ``cutoff``: token i is eligible only if ``logit_i >= cutoff`` (-inf: no cutoff). Top-k and top-p
  are folded into it by the caller.
* ``min_p``: token i is eligible only if ``x_i >= x_max + log(min_p)``, x_max over the tokens that
  pass the cutoff; that is ``p_i >= min_p * p_max`` in log space, and min_p = 0 (log = -inf) is off.

Ties go to the smallest token id. The two implementations agree exactly except where float
rounding of ``log`` (a last-bit difference between libraries) decides a near-tie.
"""
from __future__ import annotations

import torch

from tandem.kernels import num_sms

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs still run sample_reference
    triton = None


def _jit(fn=None, **options):
    # Without Triton the kernels stay plain (never called) functions, so this module still imports.
    if fn is None:
        return lambda f: _jit(f, **options)
    return triton.jit(fn, **options) if triton is not None else fn


# Vocabulary entries per program step: 4 per thread at 8 warps. On sm_90 that compiles to 48
# registers and no spills (2048 would need 72), so 5 programs fit on an SM.
_BLOCK = 1024
_NUM_WARPS = 8
_PROGRAMS_PER_SM = 4  # fused_sample's target; 5 programs fit on an SM (above)
_MIN_SPLIT_BLOCKS = 4  # a share's smallest size in blocks, so the merge stays a small part of the work
_MAX_SPLITS = 32
_CHUNK_ELEMENTS = 1 << 21  # sample_reference: rows per chunk so one [rows, V] temporary is ~2M elements


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------

@_jit
def _mix32(x):
    # uint32 products wrap mod 2**32: the same values as _mix32_torch's int64 `& 0xFFFFFFFF`
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x446CA68B
    return x ^ (x >> 16)


@_jit
def _row_key(seed, gen_index):
    """The per-row half of uniform_noise's hash, from int64 seed and output index."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(_mix32(lo ^ _mix32(hi)) ^ (gen_index & 0xFFFFFFFF).to(tl.uint32))


@_jit
def _uniform(key, cols):
    """uniform_noise(seed, gen_index)[cols] for key = _row_key(seed, gen_index)."""
    h = _mix32(_mix32(key ^ (cols.to(tl.uint32) * 0x9E3779B1)))
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216)


@_jit
def _max_allowed_logit(row_ptr, n_vocab, cutoff, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_vocab, BLOCK):
        cols = start + offs
        logit = tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        acc = tl.maximum(acc, tl.where(logit >= cutoff, logit, float("-inf")))
    return tl.max(acc, axis=0)


@_jit
def _race_scores(logit, cols, t, cutoff, threshold, key):
    """x - log(-log u) where the token is eligible, else -inf."""
    x = tl.math.div_rn(logit, t)  # correctly rounded like torch's division (plain `/` may approximate)
    eligible = (logit >= cutoff) & (x >= threshold)
    return tl.where(eligible, x - tl.log(-tl.log(_uniform(key, cols))), float("-inf"))


@_jit
def _sample_kernel(logits_ptr, row_stride, temperature_ptr, min_p_ptr, cutoff_ptr, seeds_ptr, gen_index_ptr,
                   part_score_ptr, part_col_ptr, n_vocab, chunk, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride  # rows x vocab can pass 2**31
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    t = tl.where(greedy, 1.0, temperature)
    cutoff = tl.where(greedy, float("-inf"), tl.load(cutoff_ptr + row))
    min_p = tl.where(greedy, 0.0, tl.load(min_p_ptr + row))

    # Pass 1 only where min_p needs x_max. Dividing by t > 0 with correct rounding is monotone, so
    # max_i fl(logit_i / t) == fl(max_i logit_i / t): the raw maximum suffices.
    threshold = tl.full([], float("-inf"), tl.float32)  # on x; -inf: no min-p filter
    if min_p > 0.0:
        x_max = tl.math.div_rn(_max_allowed_logit(row_ptr, n_vocab, cutoff, BLOCK), t)
        threshold = x_max + tl.log(min_p)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(gen_index_ptr + row))

    # Pass 2, over this program's share of the row, [lo, hi) (pass 1 read the whole row: every share
    # of a min-p row needs the row's maximum). Each lane keeps its own running best, updated only on
    # a strict improvement so it holds its earliest column; one reduction at the end. Lanes past the
    # share load -inf, which never beats the initial -inf.
    offs = tl.arange(0, BLOCK)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_vocab)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        # bf16 / fp16 logits widen exactly to float32: the same draw as converting the whole row first
        logit = tl.load(row_ptr + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
        if greedy:  # uniform per program: greedy rows skip the hash and the logs
            score = logit
        else:
            score = _race_scores(logit, cols, t, cutoff, threshold, key)
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
    # smallest column among the lanes holding the maximum (all -inf: column 0, as torch.argmax)
    top = tl.max(best, axis=0)
    col = tl.min(tl.where(best == top, best_col, n_vocab), axis=0)
    tl.store(part_score_ptr + row * tl.num_programs(1) + split, top)
    tl.store(part_col_ptr + row * tl.num_programs(1) + split, col)


# One variant for every split count: specialising on it would compile mid-run as batches change.
@_jit(do_not_specialize=["n_splits"])
def _merge_splits_kernel(part_score_ptr, part_col_ptr, out_ptr, n_vocab, n_splits, SPLITS_PAD: tl.constexpr):
    """Per row, the best of its shares' winners; a tie goes to the smallest column, as in one pass.
    Max and min are exact, so the draw does not depend on how the row was shared out."""
    row = tl.program_id(0)
    idx = tl.arange(0, SPLITS_PAD)
    ok = idx < n_splits
    score = tl.load(part_score_ptr + row * n_splits + idx, mask=ok, other=float("-inf"))
    col = tl.load(part_col_ptr + row * n_splits + idx, mask=ok, other=n_vocab)
    top = tl.max(score, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(ok & (score == top), col, n_vocab), axis=0).to(tl.int64))


_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROW_DTYPES = {"temperature": torch.float32, "min_p": torch.float32, "cutoff": torch.float32,
               "seeds": torch.int64, "gen_index": torch.int64}


def _check_kernel_inputs(logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
    # metadata only (no device sync): a wrong dtype or stride would otherwise be read as garbage
    if logits.dtype not in _LOGIT_DTYPES or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [S, V] float32/bfloat16/float16 with unit column stride, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    for name, tensor in rows.items():
        if tensor.dtype != _ROW_DTYPES[name] or tensor.shape != logits.shape[:1] or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{logits.shape[0]}] {_ROW_DTYPES[name]} tensor, "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")


def vocab_splits(n_rows: int, n_vocab: int, device: torch.device) -> int:
    """Programs per row: a program walks its share of the row in dependent steps, so few rows (a
    small batch) leave the GPU waiting on memory latency. Rows are cut into shares of at least
    _MIN_SPLIT_BLOCKS blocks until about _PROGRAMS_PER_SM programs per SM are in flight."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), max(n_rows, 1))
    return max(1, min(wanted, n_vocab // (_MIN_SPLIT_BLOCKS * _BLOCK), _MAX_SPLITS))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor, cutoff: torch.Tensor,
                 seeds: torch.Tensor, gen_index: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """[S, V] float32 (or bf16/fp16, read as float32) logits -> [S] int64 token ids (see the module
    docstring). Each row is shared out over ``splits`` programs (default ``vocab_splits``) whose
    winners a second small kernel merges; the draw does not depend on the count.

    temperature, min_p, cutoff: [S] float32; seeds, gen_index: [S] int64. No host syncs and no
    [S, V] temporaries, so it can be captured in a CUDA graph."""
    _check_kernel_inputs(logits, dict(temperature=temperature, min_p=min_p, cutoff=cutoff, seeds=seeds,
                                      gen_index=gen_index))
    n_rows, n_vocab = logits.shape
    out = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    if not n_rows:
        return out
    splits = min(splits or vocab_splits(n_rows, n_vocab, logits.device), _MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(n_vocab, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(n_vocab, chunk)  # no empty shares
    part_score = torch.empty(n_rows, splits, dtype=torch.float32, device=logits.device)
    part_col = torch.empty(n_rows, splits, dtype=torch.int32, device=logits.device)
    _sample_kernel[(n_rows, splits)](logits, logits.stride(0), temperature, min_p, cutoff, seeds, gen_index,
                                     part_score, part_col, n_vocab, chunk, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    _merge_splits_kernel[(n_rows,)](part_score, part_col, out, n_vocab, splits, SPLITS_PAD=_MAX_SPLITS, num_warps=1)
    return out


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash done in int64 with multipliers < 2**31, so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x446CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, gen_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), a pure function of (seed, gen_index, vocab id)."""
    row = _mix32_torch(_mix32_torch((seeds & _M32) ^ _mix32_torch((seeds >> 32) & _M32)) ^ (gen_index & _M32))
    col = (torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 0x9E3779B1) & _M32
    h = _mix32_torch(_mix32_torch(row[:, None] ^ col[None, :]))
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # exact in float32 and float64 alike


def sample_reference(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor, cutoff: torch.Tensor,
                     seeds: torch.Tensor, gen_index: torch.Tensor) -> torch.Tensor:
    """The torch definition of ``fused_sample``: any device, float32 or float64 logits (the math runs
    in the logits' dtype; the noise is float32 either way). Rows go in chunks so no temporary is
    much larger than ``_CHUNK_ELEMENTS`` elements."""
    n_rows, n_vocab = logits.shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, n_vocab))
    out = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    for start in range(0, n_rows, rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        out[part] = _sample_rows(logits[part], temperature[part], min_p[part], cutoff[part], seeds[part],
                                 gen_index[part])
    return out


def _sample_rows(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor, cutoff: torch.Tensor,
                 seeds: torch.Tensor, gen_index: torch.Tensor) -> torch.Tensor:
    greedy = temperature == 0
    greedy_ids = logits.argmax(dim=-1)
    # a host check (a sync on CUDA, where fused_sample is the path): all-greedy chunks skip the hash
    if bool(greedy.all()):
        return greedy_ids
    dtype = logits.dtype
    x = logits / torch.where(greedy, 1.0, temperature).to(dtype)[:, None]
    eligible = logits >= cutoff.to(dtype)[:, None]
    x_max = x.masked_fill(~eligible, float("-inf")).amax(dim=-1, keepdim=True)
    eligible &= x >= x_max + min_p.to(dtype).log()[:, None]  # min_p == 0: log = -inf, no filter
    log_neg_log_u = uniform_noise(seeds, gen_index, logits.shape[1]).to(dtype).log_().neg_().log_()
    scores = x.sub_(log_neg_log_u).masked_fill_(~eligible, float("-inf"))
    return torch.where(greedy, greedy_ids, scores.argmax(dim=-1))
