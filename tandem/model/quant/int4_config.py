"""4-bit weight-only ``quantization_config``s (torch-free, like ``config``): AWQ, GPTQ and
compressed-tensors ``pack-quantized``, each parsed into an ``Int4Config``.

- ``quant_method: awq``: ``bits`` 4, ``version`` ``gemm`` (AutoAWQ's GEMM layout), ``zero_point``
  true; ``modules_to_not_convert`` excludes modules whose name contains an entry.
- ``quant_method: gptq``: ``bits`` 4, ``checkpoint_format`` ``gptq`` (zero points stored minus one)
  or ``gptq_v2``; ``desc_act`` (act order, through ``g_idx``) and ``sym`` either way.
- compressed-tensors ``format: pack-quantized``: one config group targeting ``Linear``, weights
  ``num_bits`` 4, ``type`` int, strategy ``group`` or ``channel``, symmetric or not, ``actorder``
  any (``group`` stores ``weight_g_idx``); no input activation quantization (W4A16 only).

Group sizes: a multiple of 32, or -1 / ``channel`` (one group over all input channels). Anything else
is refused, naming it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.model.quant.spec import QuantConfig, _names, linear_group

INT4_METHODS = ("awq", "gptq", "compressed-tensors")


@dataclass(frozen=True)
class Int4Config(QuantConfig):
    """``QuantConfig`` of a 4-bit checkpoint: ``method`` is the format (INT4_METHODS), ``weights``
    ``"int4"``, ``activations`` ``"none"`` (weight-only)."""

    group_size: int = 128  # -1: per output channel
    gptq_v2: bool = False  # GPTQ zero points stored as they are (not minus one)
    symmetric: bool = False  # every zero point 8: none stored on the device

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"int4 ({self.source}: {group} weights, activations unquantized)"


def _refuse(what: str) -> ValueError:
    return ValueError(f"quantization_config: {what} is not implemented (tandem loads 4-bit weights from awq "
                      "version gemm, gptq and compressed-tensors pack-quantized, num_bits 4)")


def _group(value: Any) -> int:
    if not isinstance(value, int) or not (value == -1 or value > 0 and value % 32 == 0):
        raise _refuse(f"group_size={value!r} (a multiple of 32, or -1)")
    return value


def parse_awq(q: dict[str, Any]) -> Int4Config:
    if q.get("bits", 4) != 4 or q.get("w_bit", 4) != 4:
        raise _refuse(f"awq bits={q.get('bits', q.get('w_bit'))!r}")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse(f"awq version={q.get('version')!r} (only the gemm layout)")
    if q.get("zero_point", True) is not True:
        raise _refuse("awq zero_point=False")
    return Int4Config("awq", "awq", "int4", "none", group_size=_group(q.get("group_size", q.get("q_group_size"))),
                      skip_containing=_names(q.get("modules_to_not_convert"), "modules_to_not_convert"))


def parse_gptq(q: dict[str, Any]) -> Int4Config:
    if q.get("bits") != 4:
        raise _refuse(f"gptq bits={q.get('bits')!r}")
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(f"gptq checkpoint_format={fmt!r}")
    for key in ("dynamic", "modules_in_block_to_quantize"):
        if q.get(key):
            raise _refuse(f"gptq {key}={q[key]!r}")
    if q.get("lm_head"):
        raise _refuse("gptq lm_head=True (a quantized LM head)")
    return Int4Config("gptq", "gptq", "int4", "none", group_size=_group(q.get("group_size")), gptq_v2=fmt == "gptq_v2",
                      symmetric=q.get("sym", True) is True,
                      skip_containing=_names(q.get("modules_to_not_convert"), "modules_to_not_convert"))


def parse_pack_quantized(q: dict[str, Any]) -> Int4Config:
    """compressed-tensors with ``format: pack-quantized`` (``config.CT_FORMATS`` sends it here)."""
    group = linear_group(q)
    if group.get("input_activations") is not None:
        raise _refuse("pack-quantized with quantized activations (only weight-only W4A16)")
    w = group.get("weights") or {}
    if w.get("num_bits") != 4 or w.get("type", "int") != "int" or w.get("dynamic"):
        raise _refuse(f"pack-quantized weights num_bits={w.get('num_bits')!r} type={w.get('type')!r} "
                      f"dynamic={w.get('dynamic')!r}")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise _refuse(f"pack-quantized weights strategy={strategy!r}")
    size = _group(w.get("group_size")) if strategy == "group" else -1
    return Int4Config("compressed-tensors", "compressed-tensors", "int4", "none", group_size=size,
                      symmetric=w.get("symmetric", True) is True,
                      ignore=_names(q.get("ignore"), "ignore"), kv_cache_scheme=q.get("kv_cache_scheme"))


def parse_int4(q: dict[str, Any]) -> Int4Config:
    """The parser of ``q``'s format (``config`` sends the 4-bit ones here)."""
    method = q.get("quant_method")
    if method == "awq":
        return parse_awq(q)
    return parse_gptq(q) if method == "gptq" else parse_pack_quantized(q)


# ``quantization="int4"`` on an unquantized checkpoint: round-to-nearest symmetric 4-bit weights,
# group 128, made at load (``int4.quantize_rtn``); the LM head stays in the model dtype.
ONLINE_INT4 = Int4Config("int4", "online", "int4", "none", ignore=("lm_head",), group_size=128, symmetric=True)
