"""Paged attention behind one small interface.

The KV cache of one layer is ``[2, num_slots, kv_heads, head_dim]`` where slot = block * block_size
+ offset. Block 0 is never handed out: padding tokens write there and padded block-table entries
point there, so static (graph-captured) shapes need no branches.

The torch backend gathers each sequence's pages into a padded dense tensor and calls SDPA with a
causal/length mask; it is the reference for faster kernels and runs everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.kernels import triton_available

# cuDNN's fused attention is left out: compute-sanitizer's racecheck flags hazards inside it (its
# asynchronous shared-memory copies), and flash / memory-efficient kernels serve these shapes.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    """Device tensors describing one flat step; built once per step, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V goes to
    block_tables: torch.Tensor  # [B, max_blocks] int64: pages of each sequence (0 = padding)
    token_batch: torch.Tensor  # [T] int64: sequence index of each flat token
    token_row: torch.Tensor  # [T] int64: row of each flat token within its sequence's chunk
    mask: torch.Tensor | None  # [B, 1, max_q, max_k] bool, True where a query may attend a key (SDPA path only)
    max_q: int
    seq_lens_k: torch.Tensor | None = None  # [B] int64: context length including this step's tokens
    sliding_window: int | None = None


def uses_decode_kernel(max_q: int, device: torch.device) -> bool:
    """Decode steps on CUDA take the Triton kernel, which needs no mask."""
    return max_q == 1 and device.type == "cuda" and triton_available()


def build_mask(q_positions: torch.Tensor, seq_lens_k: torch.Tensor, max_k: int,
               sliding_window: int | None) -> torch.Tensor:
    """q_positions: [B, max_q] absolute positions (padding rows hold 0); seq_lens_k: [B]."""
    k_pos = torch.arange(max_k, device=q_positions.device)
    q = q_positions[:, :, None]
    mask = (k_pos[None, None, :] <= q) & (k_pos[None, None, :] < seq_lens_k[:, None, None])
    if sliding_window is not None:
        mask &= q - k_pos[None, None, :] < sliding_window
    return mask[:, None]


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    cache[0].index_copy_(0, slot_mapping, k)
    cache[1].index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, block_size: int,
                    scale: float) -> torch.Tensor:
    """q: [T, Hq, D] (new tokens, K/V already stored) -> [T, Hq * D].

    Decode steps on CUDA (one token per sequence, in sequence order) take the Triton paged kernel;
    everything else the gather + SDPA path below, which is also its reference."""
    if uses_decode_kernel(meta.max_q, q.device) and meta.seq_lens_k is not None:
        from tandem.kernels.paged_decode import paged_decode_attention

        return paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens_k, block_size, scale,
                                      meta.sliding_window)
    return sdpa_paged_attention(q, cache, meta, block_size, scale)


def sdpa_paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, block_size: int,
                         scale: float) -> torch.Tensor:
    """Reference path: gather each sequence's pages into a padded batch, then masked SDPA."""
    n_tokens, n_heads, head_dim = q.shape
    n_seqs = meta.block_tables.shape[0]
    n_kv = cache.shape[2]
    group = n_heads // n_kv
    q_pad = q.new_zeros(n_seqs, meta.max_q, n_heads, head_dim)
    q_pad[meta.token_batch, meta.token_row] = q
    # GQA without copying K/V: the heads that share a KV head become extra query rows.
    q_pad = q_pad.view(n_seqs, meta.max_q, n_kv, group, head_dim).permute(0, 2, 3, 1, 4)
    q_pad = q_pad.reshape(n_seqs, n_kv, group * meta.max_q, head_dim)
    pages = cache.view(2, -1, block_size, n_kv, head_dim)[:, meta.block_tables]
    k, v = pages.flatten(2, 3).permute(0, 1, 3, 2, 4)  # each [B, Hkv, max_k, D]
    mask = meta.mask.expand(-1, group, -1, -1).reshape(n_seqs, 1, group * meta.max_q, -1)
    with sdpa_kernel(_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q_pad, k, v, attn_mask=mask, scale=scale)
    out = out.view(n_seqs, n_kv, group, meta.max_q, head_dim).permute(0, 3, 1, 2, 4)
    return out[meta.token_batch, meta.token_row].reshape(n_tokens, n_heads * head_dim)
