"""Mixture-of-experts weights of any storage, with a leading expert dimension: dense tensors
[E, N, K], FP8 (``fp8_experts.Fp8Experts``) or 4-bit (``int4_experts.Int4Experts``). The loader
joins and stacks them through the helpers here, and the reference reads one expert at a time
(``expert_weight``) whatever they are; each quantized kind offers ``shape``, ``nbytes``,
``expert(e, dtype)``, ``dequantize(dtype)`` and static ``cat_rows(parts, what)`` / ``stack(parts)``."""
from __future__ import annotations

import torch

from tandem.model.quant.fp8_experts import Fp8Experts
from tandem.model.quant.int4_experts import Int4Experts

ExpertWeight = torch.Tensor | Fp8Experts | Int4Experts
QuantizedExperts = Fp8Experts | Int4Experts


def with_expert_dim(weight: torch.Tensor) -> torch.Tensor:
    """One expert's [N, K] as [1, N, K]; a fused [E, N, K] as it is."""
    return weight[None] if weight.dim() == 2 else weight


def expert_weight(w: ExpertWeight, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e`` as a dense [N, K] of ``dtype`` (quantized experts: dequantized as loading would)."""
    return w[e] if isinstance(w, torch.Tensor) else w.expert(e, dtype)


def _kind(parts: list[ExpertWeight], what: str) -> type:
    """The one storage kind of ``parts`` (torch.Tensor for dense), else ValueError naming ``what``."""
    kinds = {torch.Tensor if isinstance(p, torch.Tensor) else type(p) for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"{what}: expert weights stored as {sorted(k.__name__ for k in kinds)} cannot be joined; "
                         f"a checkpoint stores them alike")
    return kinds.pop()


def cat_expert_rows(parts: list[ExpertWeight], what: str) -> ExpertWeight:
    """``torch.cat(parts, 1)`` for dense experts, the quantized kind's ``cat_rows`` otherwise."""
    kind = _kind(parts, what)
    return torch.cat(parts, 1) if kind is torch.Tensor else kind.cat_rows(parts, what)


def stack_experts(parts: list[ExpertWeight]) -> ExpertWeight:
    """One tensor of experts from one-expert stacks [1, N, K], dense or quantized (of one kind)."""
    kind = _kind(parts, "experts")
    return torch.cat(parts) if kind is torch.Tensor else kind.stack(parts)
