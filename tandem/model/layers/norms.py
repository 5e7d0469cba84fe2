"""RMSNorm, and the residual add fused before it (the form every decoder layer uses)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, as the reference does, then scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the first layer has no residual yet."""
    residual = x if residual is None else x + residual
    return rms_norm(residual, weight, eps), residual


def gemma_norm_factor(weight: torch.Tensor) -> torch.Tensor:
    """Gemma stores RMSNorm weights centred on 0: the factor it scales by is (1 + w), in float32."""
    return 1.0 + weight.float()


def gemma_rms_norm(x: torch.Tensor, factor: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalise and scale in float32 (``factor`` from ``gemma_norm_factor``), round
    to x's dtype last (Llama's rounds before it scales: the two differ in bf16)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * factor).to(x.dtype)
