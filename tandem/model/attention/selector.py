"""The one place that decides which attention backend serves a step.

``TANDEM_ATTENTION=sdpa`` forces the reference everywhere (to compare on a GPU); ``triton`` forces
the Triton kernels even on a CPU, where they run through Triton's interpreter (tests set
``TRITON_INTERPRET=1``) so the engine's whole kernel path can be checked without a GPU."""
from __future__ import annotations

import torch

from tandem.kernels import triton_available
from tandem.model.attention.base import AttentionBackend, AttentionInputs, StepAttention
from tandem.model.attention.sdpa import SdpaBackend
from tandem.model.attention.triton_decode import TritonDecodeBackend
from tandem.model.attention.triton_varlen import TritonVarlenBackend
from tandem.switches import switch

_SDPA = SdpaBackend()
_TRITON_DECODE = TritonDecodeBackend()
_TRITON_VARLEN = TritonVarlenBackend()


def select_backend(max_q: int, device: torch.device) -> AttentionBackend:
    """On CUDA: decode steps take the Triton decode kernel, prefill and mixed steps the Triton varlen
    kernel. Elsewhere (the CPU) the SDPA reference, which is also what the kernels are tested against."""
    choice = switch("TANDEM_ATTENTION")
    use_triton = (choice == "triton" or (choice == "auto" and device.type == "cuda")) and triton_available()
    if not use_triton:
        return _SDPA
    return _TRITON_DECODE if max_q == 1 else _TRITON_VARLEN


def step_attention(inputs: AttentionInputs) -> StepAttention:
    backend = select_backend(inputs.max_q, inputs.positions.device)
    return StepAttention(backend, inputs, backend.prepare(inputs))
