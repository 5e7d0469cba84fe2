"""A checkpoint's ``quantization_config`` (and the ``quantization`` option) as one plain description.

Torch-free: the API process reads configs too. What is parsed (FP8, weights float8_e4m3fn):

- compressed-tensors ``float-quantized`` (llm-compressor): weight strategy ``tensor``, ``channel`` or
  ``block``; activations dynamic per token, static per tensor (``input_scale`` in the checkpoint) or,
  for block weights, dynamic per group of the block's width. ``ignore`` names excluded modules
  (exactly, or ``re:`` patterns); one config group targeting ``Linear``.
- ``quant_method: fp8`` (transformers' fine-grained FP8, the Qwen3/DeepSeek "-FP8" format):
  ``weight_block_size`` [bn, bk] with ``weight_scale_inv`` per block; without it, per-tensor
  ``weight_scale`` (and ``input_scale`` when ``activation_scheme`` is static).
  ``modules_to_not_convert`` / ``ignored_layers`` exclude modules whose name contains an entry.
- ``fbgemm_fp8``: per-channel weights, dynamic per-token activations clamped at ``activation_scale_ub``.
- 4-bit weight-only ``awq``, ``gptq`` and compressed-tensors ``pack-quantized``: ``int4_config``.

Everything else (another method, bit width, type, a group size, asymmetric scales) is refused with a
ValueError naming it. ``quantization`` (``--quantization``): ``auto`` the checkpoint's own;
``none`` refuses a quantized checkpoint (tandem does not silently run one as something else); ``fp8``
accepts an FP8 checkpoint and quantizes an unquantized one at load (per-channel weights, dynamic
per-token activations); ``int4`` quantizes an unquantized checkpoint to 4-bit weight-only at load
(round to nearest, symmetric, group 128) and refuses a quantized one."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tandem.model.quant.spec import FP8_SOURCES, QuantConfig, _names, _refuse, linear_group  # noqa: F401

QUANTIZATIONS = ("auto", "none", "fp8", "int4", "awq", "gptq", "compressed-tensors")


def _check_float8(args: dict[str, Any], where: str) -> None:
    if args.get("num_bits") != 8 or args.get("type", "float") != "float":
        raise _refuse(f"{where} num_bits={args.get('num_bits')!r} type={args.get('type')!r} (only 8-bit float)")
    if args.get("symmetric", True) is not True:
        raise _refuse(f"{where} symmetric=False")


def _ct_weights(w: dict[str, Any]) -> tuple[str, tuple[int, int] | None]:
    _check_float8(w, "weights")
    strategy = w.get("strategy")
    if w.get("dynamic"):
        raise _refuse("weights dynamic=True")
    if strategy in ("tensor", "channel"):
        if w.get("group_size") is not None:
            raise _refuse(f"weights group_size={w['group_size']!r}")
        return strategy, None
    if strategy == "block":
        block = w.get("block_structure")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise _refuse(f"weights block_structure={block!r}")
        return "block", (block[0], block[1])
    raise _refuse(f"weights strategy={strategy!r}")


def _ct_activations(a: dict[str, Any] | None, block: tuple[int, int] | None) -> str:
    weights = "block" if block else "tensor or channel"
    if a is None:
        raise _refuse("weight-only FP8 (no input_activations)")
    _check_float8(a, "input_activations")
    strategy, dynamic = a.get("strategy"), bool(a.get("dynamic"))
    if strategy == "token" and dynamic or strategy == "tensor" and not dynamic and block is None:
        return "dynamic" if dynamic else "static"
    if block is not None and strategy == "group" and dynamic and a.get("group_size") == block[1]:
        return "dynamic"
    raise _refuse(f"input_activations strategy={strategy!r} dynamic={dynamic!r} with {weights} weights "
                  "(supported: dynamic per token, static per tensor; dynamic per group for block weights)")


def _ct_float(q: dict[str, Any]) -> QuantConfig:
    group = linear_group(q)
    weights, block = _ct_weights(group.get("weights") or {})
    return QuantConfig("fp8", "compressed-tensors", weights, _ct_activations(group.get("input_activations"), block),
                       block, ignore=_names(q.get("ignore"), "ignore"), kv_cache_scheme=q.get("kv_cache_scheme"))


# compressed-tensors ``format`` -> its parser (the weights' storage differs per format)
def _int4(q: dict[str, Any]) -> Any:
    """AWQ, GPTQ, compressed-tensors pack-quantized: ``int4_config`` (which imports this module)."""
    from tandem.model.quant.int4_config import parse_int4

    return parse_int4(q)


CT_FORMATS: dict[str, Callable[[dict[str, Any]], Any]] = {"float-quantized": _ct_float, "naive-quantized": _ct_float,
                                                          "pack-quantized": _int4}


def _compressed_tensors(q: dict[str, Any]) -> Any:
    if q.get("format") not in CT_FORMATS:
        raise _refuse(f"compressed-tensors format={q.get('format')!r}")
    return CT_FORMATS[q["format"]](q)


def _fp8(q: dict[str, Any]) -> QuantConfig:
    if q.get("fmt", "e4m3") != "e4m3":
        raise _refuse(f"fp8 fmt={q['fmt']!r} (only e4m3)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _refuse(f"activation_scheme={scheme!r}")
    skip = _names(q.get("modules_to_not_convert"), "modules_to_not_convert") + _names(q.get("ignored_layers"),
                                                                                       "ignored_layers")
    block = q.get("weight_block_size")
    if block is None:
        return QuantConfig("fp8", "fp8", "tensor", scheme, skip_containing=skip)
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _refuse(f"weight_block_size={block!r}")
    if scheme != "dynamic":
        raise _refuse("block-wise weights with activation_scheme='static'")
    return QuantConfig("fp8", "fp8", "block", "dynamic", (block[0], block[1]), skip_containing=skip)


def _fbgemm(q: dict[str, Any]) -> QuantConfig:
    ub = q.get("activation_scale_ub")
    if ub is not None and not (isinstance(ub, (int, float)) and ub > 0):
        raise _refuse(f"activation_scale_ub={ub!r}")
    return QuantConfig("fp8", "fbgemm_fp8", "channel", "dynamic", activation_scale_ub=None if ub is None else float(ub),
                       skip_containing=_names(q.get("modules_to_not_convert"), "modules_to_not_convert"))


_PARSERS = {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "fbgemm_fp8": _fbgemm, "awq": _int4, "gptq": _int4}
ONLINE_FP8 = QuantConfig("fp8", "online", "channel", "dynamic", ignore=("lm_head",))


def parse_quantization_config(q: Any) -> QuantConfig:
    """The description of a config.json's ``quantization_config``; ValueError naming what is not implemented."""
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method not in _PARSERS:
        raise _refuse(f"quant_method={method!r}")
    return _PARSERS[method](q)


def resolve_quantization(hf: dict[str, Any], quantization: str = "auto") -> QuantConfig | None:
    """What the model loads as, given its config.json and the ``quantization`` option (see the module)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    raw = hf.get("quantization_config")
    if raw is None and quantization in ("awq", "gptq", "compressed-tensors"):
        raise ValueError(f"quantization={quantization!r}: the checkpoint has no quantization_config, and "
                         "quantization='int4' quantizes an unquantized checkpoint to 4 bits at load")
    if raw is not None and quantization == "int4":
        raise ValueError("quantization='int4' quantizes an unquantized checkpoint at load, but this one is already "
                         f"quantized ({raw.get('quant_method') if isinstance(raw, dict) else raw!r}); use 'auto'")
    if raw is None and quantization == "int4":
        from tandem.model.quant.int4_config import ONLINE_INT4

        return ONLINE_INT4
    if raw is None:
        return ONLINE_FP8 if quantization == "fp8" else None
    if quantization == "none":
        method = raw.get("quant_method") if isinstance(raw, dict) else raw
        raise ValueError(f"quantization='none' but the checkpoint is quantized (quant_method={method!r}); "
                         "use quantization='auto' (the default) to load it as it is stored")
    parsed = parse_quantization_config(raw)
    if quantization != "auto" and quantization not in (parsed.method, parsed.source):
        raise ValueError(f"quantization={quantization!r} but the checkpoint is quantized as {parsed.method!r}")
    return parsed
