"""The one place that decides which attention backend serves a step."""
from __future__ import annotations

import torch

from tandem.kernels import triton_available
from tandem.model.attention.base import AttentionBackend, AttentionInputs, StepAttention
from tandem.model.attention.sdpa import SdpaBackend
from tandem.model.attention.triton_decode import TritonDecodeBackend

_SDPA = SdpaBackend()
_TRITON_DECODE = TritonDecodeBackend()


def select_backend(max_q: int, device: torch.device) -> AttentionBackend:
    """Decode steps on CUDA take the Triton paged kernel; everything else the SDPA reference."""
    if max_q == 1 and device.type == "cuda" and triton_available():
        return _TRITON_DECODE
    return _SDPA


def step_attention(inputs: AttentionInputs) -> StepAttention:
    backend = select_backend(inputs.max_q, inputs.positions.device)
    return StepAttention(backend, inputs, backend.prepare(inputs))
