"""Decode steps (one query token per sequence) on CUDA: the Triton paged decode kernel, which reads
K/V from the pages in place and needs no mask. At small batch and long contexts it splits each
sequence's keys over several programs (flash-decoding) so every SM has work."""
from __future__ import annotations

import torch

from tandem.kernels import num_sms
from tandem.model.attention.base import AttentionBackend, AttentionInputs, AttentionSpec


class TritonDecodeBackend(AttentionBackend):
    name = "triton-decode"

    def prepare(self, inputs: AttentionInputs) -> AttentionInputs:
        return inputs

    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionInputs, spec: AttentionSpec) -> torch.Tensor:
        from tandem.kernels.paged_decode import decode_num_splits, paged_decode_attention

        # A function of the step's shape only (batch, KV heads, block-table width), so a captured
        # graph and an eager step of the same shape split alike.
        splits = decode_num_splits(q.shape[0], cache.shape[2], meta.block_tables.shape[1] * meta.block_size,
                                   num_sms(q.device))
        return paged_decode_attention(q, cache, meta.block_tables, meta.seq_lens, meta.block_size, spec.scale,
                                      spec.sliding_window, splits, softcap=spec.logit_softcap, k_scale=spec.k_scale,
                                      v_scale=spec.v_scale)
