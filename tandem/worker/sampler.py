"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p.

Randomness is counter-based: the noise for (request seed, output index, vocab id) is a pure hash of
the three, so a seeded request draws the same tokens whatever else shares its batch, after a
preemption, and in the sync and async executors alike, with no generator state to carry."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash done in int64 with multipliers < 2**31, so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x446CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, gen_index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), a pure function of (seed, gen_index, vocab id)."""
    row = _mix32(_mix32((seeds & _M32) ^ _mix32((seeds >> 32) & _M32)) ^ (gen_index & _M32))
    col = (torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 0x9E3779B1) & _M32
    h = _mix32(_mix32(row[:, None] ^ col[None, :]))
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # exact in float32 and float64 alike


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


def _top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """True where a token is filtered out."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    drop_sorted = rank >= k
    probs = sorted_logits.masked_fill(drop_sorted, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the top token always stays)
    # (rows with top_p == 1 skip this: rounding can push the cumulative sum to 1 before the tail)
    drop_sorted |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits: [S, V] float32 (float64 kept) -> [S] int64 token ids."""
    greedy = logits.argmax(dim=-1)
    if not t.any_random:
        return greedy
    temperature = torch.where(t.temperature > 0, t.temperature, 1.0).to(logits.dtype)
    logits = logits / temperature[:, None]
    if t.need_sort:
        logits = logits.masked_fill(_top_k_top_p_mask(logits, t.top_k, t.top_p), float("-inf"))
    probs = logits.softmax(dim=-1)
    probs = probs.masked_fill(probs < t.min_p[:, None].to(probs.dtype) * probs.amax(dim=-1, keepdim=True), 0.0)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p)
    exp_noise = -torch.log(uniform_noise(t.seeds, t.gen_index, logits.shape[-1]).to(probs.dtype))
    sampled = (probs / exp_noise).argmax(dim=-1)
    return torch.where(t.temperature > 0, sampled, greedy)
