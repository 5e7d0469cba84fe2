"""The linear layers' seam: a weight is a dense tensor or a quantized weight object, and the model
code applies either through ``linear`` (the call it made with ``F.linear``) and fuses either with
``cat_rows`` (q/k/v, gate/up). A quantized weight class offers ``shape``, ``nbytes`` (bytes stored,
scales included), ``dequantize(dtype)``, ``forward(x, bias)`` and a static ``cat_rows(parts)``; it
may offer ``forward_silu_gated(gate_up)`` (``silu_gated_linear``)."""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union

import torch
import torch.nn.functional as F

from tandem.switches import flag

logger = logging.getLogger(__name__)


class QuantizedWeight(Protocol):
    @property
    def shape(self) -> torch.Size: ...

    @property
    def nbytes(self) -> int: ...

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


Weight = Union[torch.Tensor, QuantizedWeight]


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a dense weight (one 16-bit row on a GPU may take ``kernels.gemv``, see
    ``gemv_on``); the quantized weight's own forward otherwise."""
    if isinstance(weight, torch.Tensor):
        if gemv_on(x, weight):
            from tandem.kernels.gemv import gemv

            return gemv(x.reshape(1, -1).contiguous(), weight, bias).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)
    return weight.forward(x, bias)


@functools.cache
def _gemv_enabled() -> bool:
    return flag("TANDEM_GEMV")


def gemv_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton one-row GEMV instead of cuBLAS for a batch of one: on a CUDA device, 16-bit x and
    weight of one dtype, with ``TANDEM_GEMV=1`` (off until the H100 shows it faster end to end). The
    switch is read first: every dense linear of an eager step asks."""
    return (_gemv_enabled() and x.numel() == x.shape[-1] and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.is_contiguous())


def silu_gated_linear(gate_up: torch.Tensor, weight: Weight,
                      silu_mul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``weight`` applied to silu(gate) * up of ``gate_up`` = [gate | up] (a gated MLP's down
    projection): a quantized weight whose kernel computes the activation as it reads its input
    (``forward_silu_gated``) takes ``gate_up`` itself, saving a kernel; any other gets
    ``silu_mul(gate_up)``. The fused path is off unless ``TANDEM_GATED_DOWN=1``: on an H100 the 8B
    model's int4 decode step took 3.38 ms with it against 3.08 ms without (benchmarks/RESULTS.md)."""
    fused = getattr(weight, "forward_silu_gated", None) if flag("TANDEM_GATED_DOWN") else None
    return fused(gate_up) if fused is not None else linear(silu_mul(gate_up), weight)


def cat_rows(parts: list[Weight]) -> Weight:
    """The parts stacked along their output rows. Parts of one quantized kind fuse as that kind; a mix
    (a module excluded from quantization next to quantized ones) is dequantized to the dense parts'
    dtype, with a warning."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    kind = type(parts[0])
    if all(type(p) is kind for p in parts):
        return kind.cat_rows(parts)
    dense = next(p for p in parts if isinstance(p, torch.Tensor))
    logger.warning("fusing quantized and unquantized weights: the fused weight runs dequantized (%s)", dense.dtype)
    return torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize(dense.dtype) for p in parts])


def read_linear(get: Any, name: str, shape: tuple[int, ...], part: Any) -> Weight:
    """A linear layer's weight through a ``Getter``: quantized where the getter keeps it quantized
    (a ``quant.reader.QuantizedGetter``), else the dense tensor every getter returns."""
    read = getattr(get, "linear", None)
    return get(name, shape, part) if read is None else read(name, shape, part)


@dataclass(frozen=True)
class LinearStorage:
    """How the projection weights (q/k/v/o and dense MLPs) sit on the device, for byte counts (the
    roofline): ``element_bytes`` per weight, ``scale_bytes`` per ``block_rows`` output rows and group of
    ``group_size`` inputs (None: one group per row), ``matrix_bytes`` per matrix (a static activation
    scale)."""

    dtype: str  # what the weights are stored as, e.g. "float8_e4m3fn"
    element_bytes: float
    scale_bytes: int = 0
    group_size: int | None = None
    matrix_bytes: int = 0
    block_rows: int = 1

    def bytes_of(self, rows: int, cols: int) -> float:
        groups = 1 if self.group_size is None else math.ceil(cols / self.group_size)
        scales = math.ceil(rows / self.block_rows) * groups
        return rows * cols * self.element_bytes + scales * self.scale_bytes + self.matrix_bytes


def weight_bytes(weight: Weight) -> int:
    """Bytes a weight occupies on the device (what a GEMM reads)."""
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return weight.nbytes
