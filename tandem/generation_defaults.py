"""Request defaults from a checkpoint's ``generation_config.json`` (``--generation-config``), vLLM's rule:
under ``auto`` its temperature, top_p, top_k, min_p and repetition_penalty become the defaults of every
request that does not set them, and max_new_tokens becomes the default max_tokens; ``vllm`` keeps
SamplingParams' own defaults; a folder reads that folder's file instead of the checkpoint's.

As vLLM (which reads the file through transformers' ``GenerationConfig.to_diff_dict``), a value equal
to transformers' own default (temperature 1.0, top_p 1.0, top_k 50, repetition_penalty 1.0) is no
default: a file that writes ``top_k: 50`` leaves top_k off."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tandem.model.presets import PREFIX

log = logging.getLogger(__name__)

#: generation_config.json key -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
#: transformers' GenerationConfig defaults, which its diff dict (so vLLM) leaves out
_TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
MODES = ("auto", "vllm")


def sampling_defaults(model_path: str, generation_config: str) -> dict[str, Any]:
    """SamplingParams keywords to use where a request sets nothing (checked: a bad value is an error
    naming the file and the key)."""
    if generation_config == "vllm":
        return {}
    if generation_config == "auto":
        if model_path.startswith(PREFIX):
            return {}
        folder = Path(model_path)
    else:
        folder = Path(generation_config).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"generation_config {generation_config!r} is neither auto, vllm nor a folder")
        if not (folder / "generation_config.json").is_file():
            raise FileNotFoundError(f"generation_config: {folder} has no generation_config.json")
    return _read(folder / "generation_config.json")


def _read(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    defaults = {field: data[key] for key, field in FIELDS.items()
                if data.get(key) is not None and data[key] != _TRANSFORMERS_DEFAULTS.get(key)}
    from tandem.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc} (generation_config.json's values are request defaults; "
                         "--generation-config vllm ignores the file)") from None
    if defaults:
        log.info("request defaults from %s: %s (--generation-config vllm: SamplingParams' own)", file, defaults)
    return defaults
