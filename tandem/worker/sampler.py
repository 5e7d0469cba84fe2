"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p.

Randomness is counter-based (``tandem.kernels.sampling.uniform_noise``): the noise for (request
seed, output index, vocab id) is a pure hash of the three, so a seeded request draws the same tokens
whatever else shares its batch, after a preemption, and in the sync and async executors alike, with
no generator state to carry."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.kernels import triton_available
from tandem.kernels.sampling import sample_reference
from tandem.switches import switch

def use_kernels(logits: torch.Tensor) -> bool:
    """Whether the sampling stage's Triton kernels take these logits: on CUDA, except float64 (kept
    on the torch definitions for exact tests). ``TANDEM_SAMPLER=triton`` forces them elsewhere (on
    a CPU through Triton's interpreter, for tests), ``torch`` keeps the definitions everywhere."""
    choice = switch("TANDEM_SAMPLER")
    if choice == "torch" or logits.dtype == torch.float64 or not triton_available():
        return False
    return logits.is_cuda or choice == "triton"


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [S] float32, 0 = greedy
    top_k: torch.Tensor  # [S] int64, 0 = off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    seeds: torch.Tensor  # [S] int64
    gen_index: torch.Tensor  # [S] int64
    any_random: bool
    need_sort: bool


# Rows sorted at once when computing top-k/top-p cutoffs: bounds the sort's temporaries (values,
# indices, probabilities) to a few times this many elements, whatever the batch.
_CUTOFF_CHUNK_ELEMENTS = 1 << 22


def top_k_top_p_cutoff(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """[S] the smallest raw logit each row keeps under its top-k and top-p (-inf: it keeps all).

    Top-k keeps the logits at least as large as the k-th largest; top-p then keeps the smallest
    prefix of the remaining ones, by probability at the row's temperature, whose mass reaches
    top_p (the top token always stays). Ties at the cutoff are all kept. Rows are sorted in chunks."""
    n_rows, vocab = logits.shape
    rows_per_chunk = max(1, _CUTOFF_CHUNK_ELEMENTS // vocab)
    out = torch.empty(n_rows, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                      device=logits.device)
    for start in range(0, n_rows, rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        out[part] = _cutoff_rows(logits[part], temperature[part], top_k[part], top_p[part])
    return out


def _cutoff_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # exact: the cutoff is one of the logits, compared widened in the kernel
    ranked = logits.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kept_by_k = ranked >= ranked.gather(1, (k - 1)[:, None])
    t = torch.where(temperature > 0, temperature, 1.0).to(logits.dtype)
    probs = (ranked / t[:, None]).masked_fill(~kept_by_k, float("-inf")).softmax(dim=-1)
    # rows with top_p == 1 skip this: rounding can push the cumulative sum to 1 before the tail
    kept_by_p = ((probs.cumsum(dim=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1.0)
    count = (kept_by_k & kept_by_p).sum(dim=-1)  # both are prefixes of the ranking
    # at least the top token, also for a row of NaN logits: an out-of-range gather would assert on the
    # device and take the whole process down with it
    cutoff = ranked.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
    off = (top_k <= 0) & (top_p >= 1.0)
    return cutoff.masked_fill(off, float("-inf"))


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits: [S, V] in the model's dtype (float64 kept for exact tests) -> [S] int64 token ids.

    Greedy rows take the argmax. Random rows race exponential noise (``tandem.kernels.sampling``
    defines the draw): on CUDA the fused Triton kernel, whose memory is O(rows); elsewhere its torch
    reference. Top-k / top-p become a per-row logit cutoff, computed only when a row asks for them:
    on CUDA by a Triton radix search (``tandem.kernels.top_k_top_p``, one launch for any batch),
    elsewhere by the sort that defines it."""
    if not t.any_random:
        return logits.argmax(dim=-1)
    if use_kernels(logits):
        from tandem.kernels.sampling import fused_sample
        from tandem.kernels.top_k_top_p import fused_cutoff

        cutoff = (fused_cutoff(logits, t.temperature, t.top_k, t.top_p) if t.need_sort
                  else torch.full_like(t.temperature, float("-inf")))
        return fused_sample(logits, t.temperature, t.min_p, cutoff, t.seeds, t.gen_index)
    if t.need_sort:
        cutoff = top_k_top_p_cutoff(logits, t.temperature, t.top_k, t.top_p)
    else:
        cutoff = torch.full_like(t.temperature, float("-inf"), dtype=torch.float32)
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return sample_reference(wide, t.temperature, t.min_p, cutoff.to(wide.dtype), t.seeds, t.gen_index)
