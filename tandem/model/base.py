"""The model seam: what every model implements, and all that the worker relies on.

A model is stateless apart from its weights (and tables such as rotary ones): the KV cache and the
step's attention metadata are passed in. The worker, the memory plan, warm-up, CUDA graph capture and
tensor parallelism see models only through these types, never through a concrete class.

- ``CausalLM``: the whole forward over one flat token batch, the logits, and the model's KV cache
  layout (``KVSpec``: one ``AttentionSpec`` per layer, so that per-layer sliding windows, soft-capping
  and scales reach the attention backends).
- ``LayeredCausalLM``: a ``CausalLM`` that also offers its forward in pieces split at every attention
  (``embed``, ``before_attention``, ``after_attention``, ``final_norm``): what piecewise CUDA graphs
  capture. A model that cannot be split (the transformers backend) is run whole.

A family is one module under ``tandem/model/models/`` whose model class has a ``load`` classmethod
(see ``ModelLoader``) and one line in ``tandem/model/registry.py``."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from tandem.model.attention.base import AttentionSpec, StepAttention
from tandem.model.model_config import ModelConfig
from tandem.model.tp_layout import Part, TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps

#: (checkpoint tensor name, its full shape, the part this rank reads or None for all) -> tensor on the device;
#: raises ``MissingWeight`` for a name the checkpoint lacks (a family may then try another layout)
Getter = Callable[[str, tuple[int, ...], "Part | None"], torch.Tensor]


def padded(tensor: torch.Tensor, part: Part | None) -> torch.Tensor:
    """Zeros after a part that ends before its size (the last vocabulary shard): what a Getter returns."""
    missing = 0 if part is None else part.size - tensor.shape[part.dim]
    if not missing:
        return tensor
    pad = list(tensor.shape)
    pad[part.dim] = missing
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=part.dim)


class MissingWeight(ValueError):
    """A checkpoint has no tensor of that name."""


@dataclass(frozen=True)
class KVSpec:
    """The KV cache one model needs: every layer holds ``num_kv_heads`` x ``head_dim`` keys and values
    per token (this rank's share under tensor parallelism)."""

    num_kv_heads: int
    head_dim: int
    layers: tuple[AttentionSpec, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def sliding_windows(self) -> tuple[int | None, ...]:
        return tuple(layer.sliding_window for layer in self.layers)


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig  # this rank's view: its heads, KV heads and MLP width under tensor parallelism
    kv_spec: KVSpec
    device: torch.device
    dtype: torch.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attn: StepAttention) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, slots, kv_heads, head_dim] -> hidden [T, H]
        (after the final norm). Writes this step's K and V into the cache."""
        ...

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, V] over the whole vocabulary (gathered across ranks), in the model's dtype; written
        into ``out`` when given (CUDA graphs share one logits buffer)."""
        ...


@runtime_checkable
class LayeredCausalLM(CausalLM, Protocol):
    """The forward in pieces: everything between two attentions can be captured as one graph."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        ...

    def before_attention(self, i: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                         cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i up to its attention; stores K and V at ``slot_mapping``. Returns q [T, Hq, D] and the
        residual stream to hand to ``after_attention``."""
        ...

    def after_attention(self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of layer i from its attention's output [T, Hq * D]."""
        ...

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        ...


class ModelLoader(Protocol):
    """What a family's model class offers the registry."""

    def load(self, config: ModelConfig, get: Getter, tp: TPLayout, max_positions: int,
             comm: SingleDevice | TensorParallelOps) -> CausalLM:
        """The model with rank ``tp.rank``'s weights, read through ``get`` by checkpoint tensor name."""
        ...

    def ignored_tensors(self, config: ModelConfig) -> tuple[str, ...]:
        """Name suffixes of checkpoint tensors the forward rightly does not read (not leftovers)."""
        ...


class LayeredForward:
    """``forward`` of a ``LayeredCausalLM``, from its pieces (mixed into the native families)."""

    def forward(self: LayeredCausalLM, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attn: StepAttention) -> torch.Tensor:
        hidden, residual = self.embed(input_ids), None
        for i, spec in enumerate(self.kv_spec.layers):
            q, residual = self.before_attention(i, hidden, residual, positions, kv_cache[i], attn.inputs.slot_mapping)
            hidden, residual = self.after_attention(i, attn.attend(q, kv_cache[i], spec), residual)
        return self.final_norm(hidden, residual)
