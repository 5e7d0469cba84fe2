"""What every attention backend takes and offers.

The KV cache of one layer is ``[2, num_slots, kv_heads, head_dim]`` where slot = block * block_size
+ offset, of the model dtype or fp8, e4m3 or e5m2 (``AttentionSpec.k_scale`` / ``v_scale`` scale it). Block 0 is never handed out: padding tokens write there and padded block-table entries
point there, so static (graph-captured) shapes need no branches."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes beyond plain causal softmax attention."""

    scale: float  # multiplies q.k before the softmax
    sliding_window: int | None = None  # a query sees only the last ``sliding_window`` keys (itself included)
    logit_softcap: float | None = None  # scores become cap * tanh(scores / cap) before the softmax
    # An fp8 KV cache holds K / k_scale and V / v_scale (per-tensor scales of this layer); the
    # backends multiply them back. They do nothing on a cache of the model dtype, which holds K and V as they are.
    k_scale: float = 1.0
    v_scale: float = 1.0


@dataclass
class AttentionInputs:
    """Device tensors describing one flat step (each sequence's tokens contiguous), shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V goes to
    block_tables: torch.Tensor  # [B, max_blocks] pages of each sequence (0 = padding)
    query_start: torch.Tensor  # [B + 1] offset of each sequence's first token in the flat batch
    seq_lens: torch.Tensor  # [B] context length including this step's tokens
    positions: torch.Tensor  # [T] absolute position of each token
    max_q: int  # longest query chunk of one sequence (host value)
    block_size: int


class AttentionBackend(ABC):
    """One kernel family. ``prepare`` runs once per step, ``attend`` once per layer with that layer's
    ``AttentionSpec`` (scale, sliding window, soft-cap: they may differ between layers). Backends only
    read the cache: the layer writes this step's K and V before attending (fused with rotary on CUDA)."""

    name: str = "?"

    def prepare(self, inputs: AttentionInputs) -> Any:
        """Metadata derived from the step's inputs, on the device, without host synchronisation."""
        return inputs

    @abstractmethod
    def attend(self, q: torch.Tensor, cache: torch.Tensor, meta: Any, spec: AttentionSpec) -> torch.Tensor:
        """q: [T, Hq, D] (this step's K/V already stored) -> [T, Hq * D]."""


@dataclass
class StepAttention:
    """A backend bound to one step's metadata: what the model's layers call."""

    backend: AttentionBackend
    inputs: AttentionInputs
    meta: Any

    def attend(self, q: torch.Tensor, cache: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """q: [T, Hq, D] attends the cache (this step's K/V already stored by the layer) as ``spec`` says."""
        return self.backend.attend(q, cache, self.meta, spec)

