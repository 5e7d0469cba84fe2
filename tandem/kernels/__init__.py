"""Triton kernels. Imported lazily: Triton is needed only on CUDA (and for interpreter tests)."""
from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, which launch-size heuristics aim to fill."""
    if device.type != "cuda":
        return 8  # the interpreter on a CPU: any count; small, so tests exercise the split paths
    return torch.cuda.get_device_properties(device).multi_processor_count
