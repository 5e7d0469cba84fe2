"""Reading a quantized model's weights: a ``Getter`` that wraps the plain one.

``get(name, shape, part)`` (the Getter every family uses) always returns a dense tensor: an FP8
weight is dequantized (an LM head). ``get.expert(...)`` (the MoE block's experts) keeps FP8 experts
FP8 (``Fp8Experts``) where ``keeps_fp8`` holds, and quantizes dense ones per output channel under
``--quantization fp8``; elsewhere it dequantizes them as ``get`` does. ``get.linear(...)`` (what
``quant.linear.read_linear`` calls for q/k/v/o and the MLP projections) returns an ``Fp8Weight`` where
this device multiplies in FP8 (``fp8.native_fp8``, per-row scales); elsewhere the weight is
dequantized at load to the model dtype, with a warning: the model then runs weight-only (its
activations are not quantized), with the unquantized model's memory and speed.

Which weights are FP8 is what the checkpoint stores (float8_e4m3fn); ``QuantConfig`` says where
their scales are, and a weight stored in FP8 that the config excludes, or a projection the config
quantizes stored dense, is an error naming it."""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from tandem.model.base import Getter, padded
from tandem.model.quant.config import QuantConfig
from tandem.model.quant.fp8 import Fp8Weight, native_fp8, quantize_per_channel
from tandem.model.quant.expert_weights import ExpertWeight, with_expert_dim
from tandem.model.quant.fp8_experts import Fp8Experts
from tandem.model.quant.int4_config import Int4Config
from tandem.model.quant.int4_linear import int4_storage
from tandem.model.quant.linear import LinearStorage, Weight
from tandem.model.tp_layout import Part

logger = logging.getLogger(__name__)


def keeps_fp8(qc: QuantConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the projections stay FP8 on this device (else they are dequantized at load)."""
    return qc.method == "fp8" and native_fp8(device, dtype)


def linear_storage(qc: QuantConfig | None, device: torch.device, dtype: torch.dtype) -> LinearStorage | None:
    """How the projections are stored when ``qc`` loads on ``device``; None: dense, in ``dtype``."""
    if isinstance(qc, Int4Config):
        return int4_storage(qc, device, dtype)
    if qc is None or not keeps_fp8(qc, device, dtype):
        return None
    if qc.block is not None:  # one float32 scale per block
        return LinearStorage("float8_e4m3fn", 1, scale_bytes=4, group_size=qc.block[1], block_rows=qc.block[0])
    return LinearStorage("float8_e4m3fn", 1, scale_bytes=4, matrix_bytes=4 if qc.activations == "static" else 0)


class RawReader(Protocol):
    """What ``loader.CheckpointReader`` offers for tensors kept as stored."""

    def stored_dtype(self, name: str) -> str: ...

    def raw(self, name: str, shape: tuple[int, ...] | None, part: Part | None = None) -> torch.Tensor: ...


class QuantizedGetter:
    """A ``Getter`` over an FP8 checkpoint (``reader``) or over dense weights quantized at load
    (``QuantConfig.source == "online"``, ``reader`` None)."""

    def __init__(self, plain: Getter, qc: QuantConfig, device: torch.device, dtype: torch.dtype,
                 reader: RawReader | None = None) -> None:
        self.plain, self.qc, self.dtype, self.reader = plain, qc, dtype, reader
        self.native, self.warned_dense = keeps_fp8(qc, device, dtype), False
        if not self.native:
            logger.warning("%s: weights are dequantized at load to %s on %s (FP8 GEMMs need CUDA compute "
                           "capability >= 8.9 and dtype bfloat16); the model runs weight-only (activations not "
                           "quantized) with the unquantized model's memory and speed", qc.describe(), dtype, device)

    def __call__(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        weight = self._read(name, shape, part, linear=False)
        if isinstance(weight, torch.Tensor):
            return weight
        if self.native and not self.warned_dense:  # else the warning above said it all
            self.warned_dense = True
            logger.warning("FP8 weights read outside the linear layers and the experts (%s, and any like it: an "
                           "LM head) are dequantized at load to %s", name, self.dtype)
        return self._dense(weight, part)

    def linear(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> Weight:
        weight = self._read(name, shape, part, linear=True)
        return weight if isinstance(weight, torch.Tensor) or self.native else self._dense(weight, part)

    def expert(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> ExpertWeight:
        """Experts' weights with a leading expert dimension: a fused [E, N, K] tensor, or one expert's
        projection [N, K] as [1, N, K]. FP8 (``Fp8Experts``) on the native path, else dense. Experts
        stored dense where the config quantizes them load dense, as they did before FP8 experts
        (the checks of ``linear`` are for projections)."""
        module = name.removesuffix(".weight")
        if not self.native:
            return with_expert_dim(self(name, shape, part))
        if self.reader is None:  # --quantization fp8: per output channel, as the linear layers
            dense = with_expert_dim(self.plain(name, shape, part))
            return Fp8Experts.quantize(dense) if self.qc.quantizes(module) else dense
        if len(shape) != 2:  # fused FP8 expert tensors: no FP8 format stores them so; dequantized
            return self(name, shape, part)
        weight = self._read(name, shape, part, linear=False)
        return weight[None] if isinstance(weight, torch.Tensor) else Fp8Experts.of(weight)

    def _read(self, name: str, shape: tuple[int, ...], part: Part | None, linear: bool) -> Weight:
        module = name.removesuffix(".weight")
        if self.reader is None:  # quantized at load: the linear layers only
            dense = self.plain(name, shape, part)
            return quantize_per_channel(dense) if linear and self.qc.quantizes(module) else dense
        stored_fp8 = name.endswith(".weight") and self.reader.stored_dtype(name) == "F8_E4M3"
        if stored_fp8 and not self.qc.quantizes(module):
            raise ValueError(f"{name} is stored in FP8 but quantization_config excludes {module!r}")
        if not stored_fp8:
            if linear and self.qc.quantizes(module):
                raise ValueError(f"quantization_config quantizes {module!r} but the checkpoint stores {name} as "
                                 f"{self.reader.stored_dtype(name)}, not FP8 (E4M3)")
            return self.plain(name, shape, part)
        return self._stored(module, shape, part)

    def _stored(self, module: str, shape: tuple[int, ...], part: Part | None) -> Fp8Weight:
        qc, reader = self.qc, self.reader
        weight = reader.raw(f"{module}.weight", shape, part)
        scale = reader.raw(f"{module}.{qc.scale_suffix}", None).float()
        if qc.weights == "block":
            scale = _block_part(scale, qc.block, shape, part, module)
        else:
            rows = weight.shape[0]
            want = 1 if qc.weights == "tensor" else shape[0]
            if scale.numel() != want:
                raise ValueError(f"{module}.{qc.scale_suffix} has {scale.numel()} values; {qc.weights} scales of a "
                                 f"{list(shape)} weight are {want}")
            scale = scale.reshape(-1)
            if qc.weights == "tensor":
                scale = scale.expand(rows).contiguous()
            elif part is not None and part.dim == 0:
                scale = scale[part.start:part.stop].contiguous()
        input_scale = None
        if qc.activations == "static":
            input_scale = reader.raw(f"{module}.input_scale", None).float().reshape(-1)
            if input_scale.numel() != 1:
                raise ValueError(f"{module}.input_scale has {input_scale.numel()} values (one per tensor expected)")
        return Fp8Weight(weight, scale, qc.block, input_scale, qc.activation_scale_ub)

    def _dense(self, weight: Fp8Weight, part: Part | None) -> torch.Tensor:
        return padded(weight.dequantize(self.dtype), part)


def _block_part(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, ...], part: Part | None,
                module: str) -> torch.Tensor:
    """The block scales of this rank's part: a part must start and end on block boundaries."""
    grid = tuple(-(-n // b) for n, b in zip(shape, block))
    if tuple(scale.shape) != grid:
        raise ValueError(f"{module} block scales have shape {tuple(scale.shape)}; a {list(shape)} weight in "
                         f"{list(block)} blocks needs {grid}")
    if part is None:
        return scale
    b = block[part.dim]
    if part.start % b or (part.stop % b and part.stop != shape[part.dim]):
        raise ValueError(f"{module}: tensor-parallel part [{part.start}, {part.stop}) of dimension {part.dim} of its "
                         f"{list(shape)} weight does not fall on its {b}-wide FP8 blocks; use a tensor_parallel_size "
                         f"that splits them whole")
    return scale.narrow(part.dim, part.start // b, -(-part.stop // b) - part.start // b).contiguous()
