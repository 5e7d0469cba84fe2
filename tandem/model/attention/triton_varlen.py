"""Prefill chunks and mixed steps on CUDA: the Triton varlen paged kernel. One flat batch, K/V read
from the pages in place, causal inside each chunk and full over earlier context; memory O(tokens)."""
from __future__ import annotations

import torch

from tandem.model.attention.base import AttentionBackend, AttentionInputs, AttentionSpec


class TritonVarlenBackend(AttentionBackend):
    name = "triton-varlen"

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionInputs, spec: AttentionSpec) -> torch.Tensor:
        from tandem.kernels.paged_varlen import paged_varlen_attention

        return paged_varlen_attention(q, cache, meta.block_tables, meta.query_start, meta.seq_lens, meta.block_size,
                                      spec.scale, spec.sliding_window, meta.max_q, spec.logit_softcap, spec.k_scale,
                                      spec.v_scale)
