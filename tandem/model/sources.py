"""What a model name refers to: a local checkpoint folder, or ``random:<preset>``. The host side
resolves names here (config and tokenizer, no weights, no torch); the worker loads the weights."""
from __future__ import annotations

from pathlib import Path

from tandem.model.model_config import ModelConfig, load_model_config
from tandem.model.presets import PREFIX, preset_config
from tandem.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def is_preset(source: str) -> bool:
    return source.startswith(PREFIX)


def resolve_model_config(source: str) -> ModelConfig:
    """The config of a checkpoint folder or a preset (no weights are read)."""
    if is_preset(source):
        return preset_config(source)
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"model {source!r} is neither a local checkpoint folder nor "
                                f"'{PREFIX}<preset>' (models are not downloaded)")
    return load_model_config(path)


def load_tokenizer(source: str) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder (None when it ships none: token-id prompts only), or the
    built-in byte tokenizer of the presets."""
    if is_preset(source):
        return ByteTokenizer()
    path = Path(source)
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return HFTokenizer(path) if has_files else None
