"""FP8 copies of the tiny test checkpoints, written the way the quantization tools write them.

``fp8_checkpoint(src, dst, fmt)`` quantizes the decoder layers' projection weights of checkpoint
``src`` (float32) into one of ``FORMATS`` and writes, next to it, ``<dst>-reference``: the same
model in float32 whose weights are exactly the dequantized FP8 values (what the engine must match).
The tensor names, scale shapes and ``quantization_config`` follow what llm-compressor
(compressed-tensors), transformers' fine-grained FP8 (``quant_method: fp8``) and fbgemm save.
Computed here independently of tandem's own dequantization."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8Format:
    weights: str  # tensor, channel, block
    config: dict[str, Any]  # quantization_config, with "EXCLUDED" standing for the excluded module's entry
    block: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    static_input: bool = False  # writes input_scale
    scalar_scales: bool = False  # shape [] (transformers' fp8) rather than [1] (compressed-tensors)
    excluded: str = "model.layers.0.mlp.down_proj"  # stored unquantized


def _ct(weights: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    w = dict(num_bits=8, type="float", symmetric=True, dynamic=False, group_size=None, **weights)
    a = dict(num_bits=8, type="float", symmetric=True, **inputs)
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a,
                                          "output_activations": None}},
            "ignore": ["lm_head", "EXCLUDED"], "kv_cache_scheme": None}


FORMATS: dict[str, Fp8Format] = {
    # FP8_DYNAMIC with static input scales: per-tensor weights and activations
    "ct-tensor": Fp8Format("tensor", _ct({"strategy": "tensor"}, {"strategy": "tensor", "dynamic": False}),
                           static_input=True),
    "ct-channel": Fp8Format("channel", _ct({"strategy": "channel"}, {"strategy": "token", "dynamic": True})),
    # blocks that do not divide the k/v rows (48): the last block row is partial
    "ct-block": Fp8Format("block", _ct({"strategy": "block", "block_structure": [32, 32]},
                                       {"strategy": "group", "group_size": 32, "dynamic": True}), block=(32, 32)),
    "fp8-block": Fp8Format("block", {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [16, 16], "modules_to_not_convert": ["lm_head", "EXCLUDED"]},
                           block=(16, 16), scale_name="weight_scale_inv"),
    "fp8-tensor": Fp8Format("tensor", {"quant_method": "fp8", "activation_scheme": "static",
                                       "modules_to_not_convert": ["lm_head", "EXCLUDED"]},
                            static_input=True, scalar_scales=True),
    "fbgemm": Fp8Format("channel", {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                    "modules_to_not_convert": ["lm_head", "EXCLUDED"]}),
}


def _scales(w: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Each element's scale (amax / 448 over its tensor, row or block), shaped like ``w``."""
    if fmt.weights == "tensor":
        return (w.abs().max() / E4M3_MAX).expand_as(w)
    if fmt.weights == "channel":
        return (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).expand_as(w)
    out = torch.empty_like(w)
    bn, bk = fmt.block
    for r in range(0, w.shape[0], bn):
        for c in range(0, w.shape[1], bk):
            out[r:r + bn, c:c + bk] = w[r:r + bn, c:c + bk].abs().max() / E4M3_MAX
    return out


def _stored_scale(per_element: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    if fmt.weights == "tensor":
        return per_element[0, 0].reshape(() if fmt.scalar_scales else (1,)).clone()
    if fmt.weights == "channel":
        return per_element[:, :1].clone()  # [N, 1]
    return per_element[::fmt.block[0], ::fmt.block[1]].clone()


def quantize(w: torch.Tensor, fmt: Fp8Format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 weight, its stored scale, the dequantized float32 weight)."""
    scale = _scales(w.float(), fmt)
    q = (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, _stored_scale(scale, fmt), q.float() * scale


def _quantized_module(name: str, fmt: Fp8Format) -> bool:
    return (name.startswith("model.layers.") and name.endswith("_proj.weight")
            and name.removesuffix(".weight") != fmt.excluded)


def fp8_checkpoint(src: Path, dst: Path, fmt_name: str) -> tuple[Path, Path]:
    """(FP8 checkpoint, float32 reference with the dequantized weights) of checkpoint ``src``."""
    fmt = FORMATS[fmt_name]
    ref = dst.parent / f"{dst.name}-reference"
    shutil.copytree(src, dst)
    shutil.copytree(src, ref)
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        if not _quantized_module(name, fmt):
            quantized[name] = dequantized[name] = w
            continue
        q, scale, deq = quantize(w, fmt)
        module = name.removesuffix(".weight")
        quantized[name], quantized[f"{module}.{fmt.scale_name}"], dequantized[name] = q, scale, deq
        if fmt.static_input:
            quantized[f"{module}.input_scale"] = torch.tensor(0.02).reshape(() if fmt.scalar_scales else (1,))
    save_file(quantized, str(dst / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(ref / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    text = json.dumps(fmt.config).replace('"EXCLUDED"', json.dumps(
        fmt.excluded if fmt.config["quant_method"] == "compressed-tensors" else fmt.excluded.removeprefix("model.")))
    cfg["quantization_config"] = json.loads(text)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst, ref
