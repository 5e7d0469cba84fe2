"""Which model family serves each Hugging Face architecture name, and what that architecture implies.

Torch-free: the host side (API process, engine) checks names and reads what a config implies here;
the worker imports the family's module, lazily, only when it loads weights (``model_class``).
Adding an architecture is a module under ``tandem/model/models/`` plus one line in ``ARCHITECTURES``
(docs/architecture.md, "Adding a model")."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    module: str  # under tandem.model.models
    cls: str  # the model class in it (a ``ModelLoader``)
    implies: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields the architecture fixes


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", "LlamaModel"),
    "MistralForCausalLM": Family("llama", "LlamaModel"),
    "Qwen2ForCausalLM": Family("llama", "LlamaModel", {"qkv_bias": True}),
    "Qwen3ForCausalLM": Family("llama", "LlamaModel", {"qk_norm": True}),
}


def family_of(architectures: list[str]) -> tuple[str, Family]:
    """The first of a config's architectures that tandem implements natively."""
    for arch in architectures:
        if arch in ARCHITECTURES:
            return arch, ARCHITECTURES[arch]
    raise ValueError(f"unsupported architecture {architectures!r}; supported: {sorted(ARCHITECTURES)}")


def model_class(architecture: str) -> Any:
    """The family's model class: a ``tandem.model.base.ModelLoader`` (not imported here, which would
    bring torch into the host side)."""
    family = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f"tandem.model.models.{family.module}"), family.cls)
