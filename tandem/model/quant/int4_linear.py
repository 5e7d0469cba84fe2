"""4-bit linear weights in the model: the weight object the model code applies (``Int4Linear``, the
``quant.linear`` seam) and the ``Getter`` that reads them from an AWQ / GPTQ / pack-quantized
checkpoint (``Int4Getter``), or quantizes dense weights to 4 bits at load (``quantization="int4"``).

On CUDA a linear runs the W4A16 kernel (``tandem/kernels/w4a16.py``) on the packed weights.
Elsewhere the weights are dequantized at load to the model dtype, with a warning (the memory and
speed of the unquantized model); ``TANDEM_W4A16=triton`` keeps them packed and runs the kernel
anywhere Triton runs (the interpreter in tests). Mixture-of-experts experts (``expert``) stay 4-bit
where the linears do (``Int4Experts``, which the fused MoE kernel reads), and ``quantization="int4"``
quantizes them as it does the linears; act-order experts are dequantized at load (the fused kernel
reads groups of consecutive channels), with a warning. Weights the model reads whole (``get``: an
embedding) are dequantized.

Under tensor parallelism a column-parallel part (output rows) is any range of columns; a
row-parallel part (input channels) must fall on group boundaries and is refused for act-order
weights (their groups are scattered over the input channels)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from tandem.model.base import Getter
from tandem.model.quant import int4
from tandem.model.quant.expert_weights import ExpertWeight, with_expert_dim
from tandem.model.quant.int4 import Int4Weight
from tandem.model.quant.int4_config import Int4Config
from tandem.model.quant.int4_experts import Int4Experts
from tandem.model.quant.linear import LinearStorage, Weight
from tandem.model.tp_layout import Part
from tandem.switches import switch

logger = logging.getLogger(__name__)

# The tensors each format stores per module (``module.<suffix>``), the first one the packed weight.
SUFFIXES = {"awq": ("qweight", "qzeros", "scales"), "gptq": ("qweight", "qzeros", "scales", "g_idx"),
            "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                   "weight_g_idx")}


def use_kernel(device: torch.device) -> bool:
    return device.type == "cuda" or switch("TANDEM_W4A16") == "triton"


def int4_storage(qc: Int4Config, device: torch.device, dtype: torch.dtype) -> LinearStorage | None:
    """The projections' bytes for the roofline: half a byte per weight and, per output row and group,
    a scale in the model dtype and a zero-point byte (none when symmetric); None where they are
    dequantized at load. (An act-order permutation, 8 bytes per input channel, is left out.)"""
    if not use_kernel(device):
        return None
    return LinearStorage("int4", 0.5, scale_bytes=dtype.itemsize + (0 if qc.symmetric else 1),
                         group_size=None if qc.group_size == -1 else qc.group_size)


class Int4Linear:
    """A linear's 4-bit weight [N, K], as one or more ``Int4Weight``s stacked along N: fused q/k/v or
    gate/up are one GEMM unless act order gave the parts different input permutations."""

    def __init__(self, parts: list[Int4Weight]) -> None:
        self.parts = parts

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.out_features for p in self.parts), self.parts[0].in_features))

    @property
    def nbytes(self) -> int:
        tensors = [t for p in self.parts for t in (p.qweight, p.scales, p.zeros, p.perm) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([int4.dequantize(p).to(dtype) for p in self.parts])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from tandem.kernels.w4a16 import w4a16_matmul  # Triton: imported only where the kernel runs

        out = self._parts_cat([w4a16_matmul(x, p) for p in self.parts])
        return out if bias is None else out + bias

    def forward_silu_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The weight applied to silu(gate) * up of gate_up = [gate | up] (``linear.silu_gated_linear``)."""
        from tandem.kernels.w4a16 import w4a16_matmul

        return self._parts_cat([w4a16_matmul(gate_up, p, gated=True) for p in self.parts])

    @staticmethod
    def _parts_cat(outs: list[torch.Tensor]) -> torch.Tensor:
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @staticmethod
    def cat_rows(parts: list[Int4Linear]) -> Int4Linear:
        merged: list[Int4Weight] = []
        for p in (w for part in parts for w in part.parts):
            if merged and _fusable(merged[-1], p):
                merged[-1] = _cat(merged[-1], p)
            else:
                merged.append(p)
        return Int4Linear(merged)


def along_k(w: Int4Weight) -> Int4Weight:
    """``w`` with its packed words dense along K (each output channel's words one run in memory; the
    same [K / 8, N] tensor, as a transposed view). The kernel reads either layout; on an H100 this
    one was no faster at one row (gate_up 64 us against 61) and slower with the default tiles and end
    to end (benchmarks/RESULTS.md), so the engine keeps the words dense along N, as checkpoints
    store them; ``scripts/quant_tune.py --layout=k`` measures this one."""
    if w.qweight.stride(0) == 1:
        return w
    return dataclasses.replace(w, qweight=w.qweight.t().contiguous().t())


def _fusable(a: Int4Weight, b: Int4Weight) -> bool:
    same_perm = a.perm is None and b.perm is None or (
        a.perm is not None and b.perm is not None and torch.equal(a.perm, b.perm))
    return a.group_size == b.group_size and a.in_features == b.in_features and same_perm


def _zeros(w: Int4Weight) -> torch.Tensor:
    return w.zeros if w.zeros is not None else torch.full_like(w.scales, 8, dtype=torch.uint8)


def _cat(a: Int4Weight, b: Int4Weight) -> Int4Weight:
    zeros = None if a.zeros is None and b.zeros is None else torch.cat([_zeros(a), _zeros(b)], dim=1)
    return Int4Weight(torch.cat([a.qweight, b.qweight], dim=1), torch.cat([a.scales, b.scales], dim=1), zeros,
                      a.group_size, a.perm)


def take_part(w: Int4Weight, part: Part | None, name: str) -> Int4Weight:
    """This rank's part of a [N, K] weight (``part.dim`` 0: output rows, 1: input channels)."""
    if part is None:
        return w
    if part.size != part.stop - part.start:
        raise ValueError(f"{name}: a zero-padded tensor-parallel part of a 4-bit weight is not implemented")
    a, b = part.start, part.stop
    if part.dim == 0:
        return Int4Weight(w.qweight[:, a:b].contiguous(), w.scales[:, a:b].contiguous(),
                          None if w.zeros is None else w.zeros[:, a:b].contiguous(), w.group_size, w.perm)
    g = w.group_size
    if w.perm is not None:
        raise ValueError(f"{name}: act-order (desc_act / actorder group) 4-bit weights cannot be split over input "
                         "channels under tensor parallelism")
    if a % g or b % g:
        raise ValueError(f"{name}: tensor-parallel input channels [{a}, {b}) do not fall on its {g}-channel "
                         "groups; use a tensor_parallel_size that splits the groups whole")
    return Int4Weight(w.qweight[a // 8:b // 8].contiguous(), w.scales[a // g:b // g].contiguous(),
                      None if w.zeros is None else w.zeros[a // g:b // g].contiguous(), g, None)


class Int4Getter:
    """A ``Getter`` over a 4-bit checkpoint (see the module docstring). ``reader`` is
    ``loader.CheckpointReader`` (``files``, ``raw``)."""

    def __init__(self, plain: Getter, qc: Int4Config, device: torch.device, dtype: torch.dtype, reader=None) -> None:
        self.plain, self.qc, self.device, self.dtype, self.reader = plain, qc, device, dtype, reader
        self.kernel, self.warned_width, self.warned_order = use_kernel(device), False, False
        if not self.kernel:
            logger.warning("%s: weights are dequantized at load to %s on %s (the W4A16 kernel runs on CUDA); the "
                           "model runs with the unquantized model's memory and speed", qc.describe(), dtype, device)

    def __call__(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        w = self._read(name, shape, part, linear=False)
        return w if isinstance(w, torch.Tensor) else int4.dequantize(w).to(self.dtype)

    def linear(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> Weight:
        w = self._read(name, shape, part, linear=True)
        if isinstance(w, torch.Tensor):
            return w
        return Int4Linear([w]) if self.kernel else int4.dequantize(w).to(self.dtype)

    def expert(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> ExpertWeight:
        """Experts' weights with a leading expert dimension (one expert's projection [N, K] as
        [1, N, K]): ``Int4Experts`` where the linears stay 4-bit (``use_kernel``), else dense.
        ``quantization="int4"`` quantizes dense experts (fused or not) as it does the linears."""
        module = name.removesuffix(".weight")
        if not self.kernel:
            return with_expert_dim(self(name, shape, part))
        if self.reader is None:  # quantized at load, per expert, as the linear layers
            dense = with_expert_dim(self.plain(name, shape, part))
            if not self.qc.quantizes(module) or dense.numel() == 0:  # empty: another rank's expert
                return dense
            return Int4Experts.quantize(dense, self._online_group(dense.shape[2], module))
        w = self._read(name, shape, part, linear=False) if len(shape) == 2 else None
        if not isinstance(w, Int4Weight):  # stored dense (no 4-bit format stores fused experts)
            return with_expert_dim(self(name, shape, part) if w is None else w)
        if w.perm is not None:
            if not self.warned_order:  # once: every expert of the checkpoint says the same
                self.warned_order = True
                logger.warning("%s (and any other act-order expert): dequantized at load to %s; the fused MoE "
                               "kernel reads 4-bit groups of consecutive input channels only", module, self.dtype)
            return int4.dequantize(w).to(self.dtype)[None]
        return Int4Experts.of(w)

    def _online_group(self, k: int, module: str) -> int:
        """``quantization="int4"``'s group for ``k`` input channels: the config's, else one per row."""
        if k % self.qc.group_size == 0:
            return self.qc.group_size
        if not self.warned_width:  # once: every such layer says the same
            self.warned_width = True
            logger.warning("%s (and any other layer whose input width is not a multiple of %d): quantized "
                           "per output channel", module, self.qc.group_size)
        return -1

    def _read(self, name: str, shape: tuple[int, ...], part: Part | None, linear: bool) -> torch.Tensor | Int4Weight:
        module = name.removesuffix(".weight")
        if self.reader is None:  # quantized at load (``ONLINE_INT4``): the linear layers only
            dense = self.plain(name, shape, part)
            if not (linear and name.endswith(".weight") and self.qc.quantizes(module)):
                return dense
            group = self._online_group(dense.shape[1], module)
            return int4.quantize_rtn(dense, group).to(self.device, self.dtype)
        suffixes = SUFFIXES[self.qc.source]
        stored = name.endswith(".weight") and f"{module}.{suffixes[0]}" in self.reader.files
        if stored and not self.qc.quantizes(module):
            raise ValueError(f"{module} is stored in 4 bits but quantization_config excludes it")
        if not stored:
            if linear and self.qc.quantizes(module) and name.endswith(".weight"):
                raise ValueError(f"quantization_config quantizes {module!r} but the checkpoint has no "
                                 f"{module}.{suffixes[0]}")
            return self.plain(name, shape, part)
        tensors = {s: self.reader.raw(f"{module}.{s}", None) for s in suffixes
                   if f"{module}.{s}" in self.reader.files}
        w = _unpack(self.qc, tensors)
        if (w.out_features, w.in_features) != tuple(shape):
            raise ValueError(f"{module}: 4-bit weight of shape {(w.out_features, w.in_features)}, config implies "
                             f"{tuple(shape)}")
        return take_part(w, part, module).to(self.device, self.dtype)


def _unpack(qc: Int4Config, t: dict[str, torch.Tensor]) -> Int4Weight:
    if qc.source == "awq":
        return int4.unpack_awq(t["qweight"], t["qzeros"], t["scales"], qc.group_size)
    if qc.source == "gptq":
        return int4.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), qc.group_size, qc.gptq_v2)
    return int4.unpack_compressed(t["weight_packed"], t["weight_scale"], t["weight_shape"], qc.group_size,
                                  t.get("weight_zero_point"), t.get("weight_g_idx"))
