"""One entry point from a model name (checkpoint folder or ``random:<preset>``) to a runnable model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.model.llama import LlamaModel
from tandem.model.loader import assemble_weights, load_checkpoint_weights, random_getter
from tandem.model.model_config import ModelConfig, load_model_config
from tandem.model.presets import PREFIX, preset_config
from tandem.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer | None  # None when a checkpoint ships no tokenizer: token-id prompts only


def resolve_config(source: str) -> ModelConfig:
    if source.startswith(PREFIX):
        return preset_config(source)
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"model {source!r} is neither a local checkpoint folder nor "
                                f"'{PREFIX}<preset>' (models are not downloaded)")
    return load_model_config(path)


def _tokenizer_for(path: Path) -> Tokenizer | None:
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return HFTokenizer(path) if has_files else None


def load_model(source: str, device: torch.device, dtype: torch.dtype, max_model_len: int | None = None,
               seed: int = 0) -> LoadedModel:
    """Rotary tables cover ``max_model_len`` positions (default: the model's own maximum)."""
    config = resolve_config(source)
    max_positions = max_model_len or config.max_position_embeddings
    if source.startswith(PREFIX):
        weights = assemble_weights(config, random_getter(device, dtype, seed))
        tokenizer: Tokenizer | None = ByteTokenizer()
    else:
        path = Path(source)
        weights = load_checkpoint_weights(path, config, device, dtype)
        tokenizer = _tokenizer_for(path)
    return LoadedModel(config, LlamaModel(config, weights, max_positions), tokenizer)
