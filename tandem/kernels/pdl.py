"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
kernel before it on the stream is still running, and waits for that kernel's results only where it
reads them.

At one or a few rows a decode step is a chain of ~10 short kernels per layer, each paying a launch
and a ramp-up of a few microseconds that the GPU spends idle (measured on the H100: the 8B model's
small GEMMs take 6-8 us above their bytes). A kernel of the chain calls ``wait_then_release`` before
it reads anything an earlier kernel wrote and before it writes anything: it waits until the kernel
before it has finished and its writes are visible, then lets the kernel after it launch. So at most
two kernels overlap, and as every kernel waits before it finishes, "finished" is transitive: a
kernel's wait covers every kernel before it. What a kernel may do before its wait: read data no
kernel writes during the step (weights, scales), which a weight-streaming GEMM uses to start its
first loads early. Kernels launched without it (torch's, cuBLAS) wait for the whole previous kernel,
as always; CUDA graphs keep the launch attribute.

Off by default (``TANDEM_PDL=1`` turns it on): on the H100 it keeps every output (the same tokens on
and off, through CUDA graphs) but does not pay, within 1% for bf16 and 2-3% slower with quantized
weights at batch 1 and 32 (benchmarks/RESULTS.md)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tandem.switches import flag


@functools.cache
def _supported(device_index: int) -> bool:
    from triton.backends.nvidia.compiler import CUDAOptions

    return (torch.cuda.get_device_capability(device_index)[0] >= 9
            and "launch_pdl" in CUDAOptions.__dataclass_fields__)


def pdl_launch(device: torch.device) -> dict:
    """The constexpr and launch option for a kernel taking ``PDL`` (``wait_then_release``): on for a
    Hopper-or-later CUDA device with ``TANDEM_PDL=1``; off otherwise (and always in the interpreter)."""
    on = device.type == "cuda" and flag("TANDEM_PDL") and _supported(device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """Wait for the previous kernel's results, then let the next kernel launch (no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
