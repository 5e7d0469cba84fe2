"""What a checkpoint's ``quantization_config`` says about its linear weights, as plain data, and the
helpers every format's parser shares (``config`` parses the FP8 formats, ``int4_config`` the 4-bit
ones; both build on this module, so neither imports the other)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FP8_SOURCES = ("compressed-tensors", "fp8", "fbgemm_fp8", "online")


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linear weights are stored. ``weights``: ``tensor``, ``channel`` or ``block``
    (``block`` [rows, cols] of the weight per scale); ``activations``: ``dynamic`` (per token, or per
    group of ``block[1]`` columns for block weights) or ``static`` (one ``input_scale`` per module,
    from the checkpoint)."""

    method: str  # "fp8": what the weights are stored as
    source: str  # which format described it (FP8_SOURCES)
    weights: str
    activations: str
    block: tuple[int, int] | None = None
    activation_scale_ub: float | None = None  # fbgemm: per-token scales are clamped at this amax
    ignore: tuple[str, ...] = ()  # exact names or "re:" patterns (compressed-tensors)
    skip_containing: tuple[str, ...] = ()  # a module whose name contains one is not quantized
    kv_cache_scheme: dict[str, Any] | None = None  # compressed-tensors' FP8 KV scales (not read here)

    @property
    def scale_suffix(self) -> str:
        """The checkpoint tensor holding a weight's scales (multiplied: w = q * scale)."""
        return "weight_scale_inv" if self.source == "fp8" and self.weights == "block" else "weight_scale"

    def quantizes(self, module: str) -> bool:
        """Whether ``module`` (a checkpoint name without ``.weight``) is stored quantized."""
        if any(s in module for s in self.skip_containing):
            return False
        for entry in self.ignore:
            if entry.startswith("re:") and re.match(entry[3:], module) or entry == module:
                return False
        return True

    def describe(self) -> str:
        block = f" {self.block[0]}x{self.block[1]}" if self.block else ""
        return f"fp8 ({self.source}: {self.weights}{block} weights, {self.activations} activations)"


def _refuse(what: str) -> ValueError:
    return ValueError(f"quantization_config: {what} is not implemented (tandem loads FP8: compressed-tensors "
                      "float-quantized, quant_method fp8 per-tensor or block-wise, fbgemm_fp8)")


def _names(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"quantization_config: {key} must be a list of module names, got {value!r}")
    return tuple(value)


def linear_group(q: dict[str, Any]) -> dict[str, Any]:
    """A compressed-tensors config's one config group, which must target ``Linear`` (any format)."""
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(f"compressed-tensors with {len(groups)} config_groups (one is supported)")
    (group,) = groups.values()
    if group.get("targets") != ["Linear"]:
        raise _refuse(f"config group targets={group.get('targets')!r} (only ['Linear'])")
    if group.get("output_activations") is not None:
        raise _refuse("output_activations")
    return group
