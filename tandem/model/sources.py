"""What a model name refers to: a local checkpoint folder, a Hugging Face id (``org/name``) already in
the local cache, or ``random:<preset>``. The host side resolves names here (config and tokenizer, no
weights, no torch); the worker loads the weights. Nothing is ever downloaded."""
from __future__ import annotations

import os
from pathlib import Path

from tandem.model.model_config import ModelConfig, load_model_config
from tandem.model.presets import PREFIX, preset_config
from tandem.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def is_preset(source: str) -> bool:
    return source.startswith(PREFIX)


def hub_cache_dir(download_dir: str | None = None) -> str:
    """Where Hugging Face ids are looked up: ``download_dir``, else the hub's own rule, read now (so a
    changed ``HF_HUB_CACHE`` / ``HF_HOME`` counts)."""
    if download_dir:
        return download_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def local_model_path(name: str, revision: str | None = None, download_dir: str | None = None,
                     what: str = "model") -> str:
    """A preset or a folder as given; a Hugging Face id as its snapshot folder in the local cache (at
    ``revision``). ``revision`` and ``download_dir`` apply to ids only, and are refused otherwise."""
    local = is_preset(name) or Path(name).expanduser().is_dir()
    if local:
        for option, value in (("revision", revision), ("download_dir", download_dir)):
            if value is not None:
                raise ValueError(f"{option} {value!r} applies to Hugging Face ids, and {what} {name!r} is "
                                 f"{'a preset' if is_preset(name) else 'a local folder'}")
        return name if is_preset(name) else str(Path(name).expanduser())
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{what} {name!r} is neither a local checkpoint folder, a Hugging Face id "
                                f"(org/name) nor '{PREFIX}<preset>'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir(download_dir)
    try:
        return snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as exc:
        folder = Path(cache) / ("models--" + name.replace("/", "--"))
        raise FileNotFoundError(
            f"{what} {name!r} (revision {revision or 'main'}) is not in the local Hugging Face cache: looked in "
            f"{folder} ({'it does not exist' if not folder.is_dir() else type(exc).__name__}). Models are not "
            f"downloaded: fetch it first (huggingface-cli download {name}), set --download-dir / HF_HUB_CACHE to "
            "the cache that holds it, or pass a checkpoint folder") from None


def read_chat_template(value: str) -> str:
    """``--chat-template``: a file's text, or the template itself (vLLM takes either)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"chat_template {value!r} is neither a file nor a Jinja template")


def resolve_model_config(source: str) -> ModelConfig:
    """The config of a checkpoint folder or a preset (no weights are read)."""
    if is_preset(source):
        return preset_config(source)
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"model {source!r} is neither a local checkpoint folder nor "
                                f"'{PREFIX}<preset>' (models are not downloaded)")
    return load_model_config(path)


def load_tokenizer(source: str, chat_template: str | None = None) -> Tokenizer | None:
    """The tokenizer of a checkpoint folder (None when it ships none: token-id prompts only), or the
    built-in byte tokenizer of the presets. ``chat_template`` (the template's text) replaces the
    checkpoint's."""
    if is_preset(source):
        if chat_template is not None:
            raise ValueError("chat_template: the random presets' byte tokenizer has a fixed chat format; a "
                             "template needs a checkpoint's tokenizer (--tokenizer)")
        return ByteTokenizer()
    path = Path(source)
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_files:
        if chat_template is not None:
            raise ValueError(f"chat_template: {source} has no tokenizer to apply it with")
        return None
    return HFTokenizer(path, chat_template)
