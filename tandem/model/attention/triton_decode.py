"""Decode steps (one query token per sequence) on CUDA: the Triton paged decode kernel, which reads
K/V from the pages in place and needs no mask."""
from __future__ import annotations

import torch

from tandem.model.attention.base import AttentionBackend, AttentionInputs


class TritonDecodeBackend(AttentionBackend):
    name = "triton-decode"

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionInputs) -> torch.Tensor:
        from tandem.kernels.paged_decode import paged_decode_attention

        return paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, meta.block_size, meta.scale,
                                      meta.sliding_window)
