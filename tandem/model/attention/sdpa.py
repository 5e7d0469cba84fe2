"""Reference backend: gather each sequence's pages into a padded batch, then masked SDPA.

Runs everywhere (it is the CPU path) and is the reference the Triton kernels are tested against.
Its memory grows with sequences x longest chunk x longest context, so on CUDA it serves only what
no kernel covers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.model.attention.base import AttentionBackend, AttentionInputs, AttentionSpec
from tandem.model.layers.kv import from_cache_dtype, is_fp8

# cuDNN's fused attention is left out: compute-sanitizer's racecheck flags hazards inside it (its
# asynchronous shared-memory copies), and flash / memory-efficient kernels serve these shapes.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class SdpaMetadata:
    block_tables: torch.Tensor
    token_seq: torch.Tensor  # [T] sequence index of each flat token
    token_row: torch.Tensor  # [T] row of each flat token within its sequence's chunk
    q_positions: torch.Tensor  # [B, max_q] absolute positions (padding entries hold 0)
    seq_lens: torch.Tensor
    max_q: int
    block_size: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window, built on first use

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, max_q, max_k]: True where a query may attend a key (one per window the layers use)."""
        if sliding_window not in self.masks:
            max_k = self.block_tables.shape[1] * self.block_size
            self.masks[sliding_window] = build_mask(self.q_positions, self.seq_lens, max_k, sliding_window)
        return self.masks[sliding_window]


def build_mask(q_positions: torch.Tensor, seq_lens: torch.Tensor, max_k: int,
               sliding_window: int | None) -> torch.Tensor:
    """q_positions: [B, max_q] absolute positions (padding entries hold 0); seq_lens: [B]."""
    k_pos = torch.arange(max_k, device=q_positions.device)
    q = q_positions[:, :, None]
    mask = (k_pos[None, None, :] <= q) & (k_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= q - k_pos[None, None, :] < sliding_window
    return mask[:, None]


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                         cap: float) -> torch.Tensor:
    """Attention with scores cap * tanh(q.k * scale / cap), softmax in float32 (transformers' eager
    Gemma attention, which no fused SDPA kernel offers)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def gather_pages(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int, dtype: torch.dtype,
                 spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's K and V ([B, Hkv, max_k, D] in ``dtype``) from one layer's cache; an fp8
    cache's pages are dequantized with the layer's scales (gathered as bytes: torch indexes fp8 only so)."""
    n_kv, head_dim = cache.shape[2:]
    fp8 = is_fp8(cache.dtype)
    paged = (cache.view(torch.uint8) if fp8 else cache).view(2, -1, block_size, n_kv, head_dim)
    k, v = paged[:, block_tables].flatten(2, 3).permute(0, 1, 3, 2, 4)
    if fp8:
        k = from_cache_dtype(k.view(cache.dtype), dtype, spec.k_scale)
        v = from_cache_dtype(v.view(cache.dtype), dtype, spec.v_scale)
    return k, v


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def prepare(self, inputs: AttentionInputs) -> SdpaMetadata:
        n_tokens, n_seqs = inputs.positions.shape[0], inputs.seq_lens.shape[0]
        flat = torch.arange(n_tokens, device=inputs.positions.device)
        token_seq = torch.searchsorted(inputs.query_start[1:], flat, right=True)
        token_row = flat - inputs.query_start[token_seq]
        q_positions = inputs.positions.new_zeros(n_seqs, inputs.max_q)
        q_positions[token_seq, token_row] = inputs.positions
        return SdpaMetadata(inputs.block_tables, token_seq, token_row, q_positions, inputs.seq_lens, inputs.max_q,
                            inputs.block_size)

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: SdpaMetadata, spec: AttentionSpec) -> torch.Tensor:
        n_tokens, n_heads, head_dim = q.shape
        n_seqs = meta.block_tables.shape[0]
        n_kv = cache.shape[2]
        group = n_heads // n_kv
        q_pad = q.new_zeros(n_seqs, meta.max_q, n_heads, head_dim)
        q_pad[meta.token_seq, meta.token_row] = q
        # GQA without copying K/V: the heads that share a KV head become extra query rows.
        q_pad = q_pad.view(n_seqs, meta.max_q, n_kv, group, head_dim).permute(0, 2, 3, 1, 4)
        q_pad = q_pad.reshape(n_seqs, n_kv, group * meta.max_q, head_dim)
        k, v = gather_pages(cache, meta.block_tables, meta.block_size, q.dtype, spec)  # each [B, Hkv, max_k, D]
        mask = meta.mask(spec.sliding_window).expand(-1, group, -1, -1).reshape(n_seqs, 1, group * meta.max_q, -1)
        if spec.logit_softcap is not None:
            out = softcapped_attention(q_pad, k, v, mask, spec.scale, spec.logit_softcap)
        else:
            with sdpa_kernel(_SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(q_pad, k, v, attn_mask=mask, scale=spec.scale)
        out = out.view(n_seqs, n_kv, group, meta.max_q, head_dim).permute(0, 3, 1, 2, 4)
        return out[meta.token_seq, meta.token_row].reshape(n_tokens, n_heads * head_dim)
