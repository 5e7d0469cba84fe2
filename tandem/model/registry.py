"""Which model family serves each Hugging Face architecture name, and what that architecture implies.

Torch-free: the host side (API process, engine) checks names and reads what a config implies here;
the worker imports the family's module, lazily, only when it loads weights (``model_class``).
Adding an architecture is a module under ``tandem/model/models/`` plus one line in ``ARCHITECTURES``
(docs/architecture.md, "Adding a model").

Any other ``*ForCausalLM`` name is accepted here for the transformers backend (``TRANSFORMERS``:
transformers' own modeling code on tandem's paged attention); whether transformers really implements
it, and implements it in a way tandem can run, is checked when the worker loads it. ``model_impl``
(``--model-impl``) chooses: ``auto`` the native family where there is one, ``tandem`` only native
ones, ``transformers`` the backend even for native architectures."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    module: str  # under tandem.model.models
    cls: str  # the model class in it (a ``ModelLoader``)
    implies: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields the architecture fixes
    # a config.json without layer_types: every n-th layer global, the others sliding (transformers'
    # default for the architecture; Gemma 3's sliding_window_pattern overrides it)
    sliding_pattern: int | None = None


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", "LlamaModel"),
    "MistralForCausalLM": Family("llama", "LlamaModel"),
    "Qwen2ForCausalLM": Family("llama", "LlamaModel", {"qkv_bias": True}),
    "Qwen3ForCausalLM": Family("llama", "LlamaModel", {"qk_norm": True}),
    "Gemma2ForCausalLM": Family("gemma", "GemmaModel", sliding_pattern=2),
    "Gemma3ForCausalLM": Family("gemma", "GemmaModel", {"qk_norm": True}, sliding_pattern=6),
    # mixtures of experts (models/moe_block.py)
    "Qwen3MoeForCausalLM": Family("qwen3_moe", "QwenMoeModel", {"qk_norm": True}),
    "Qwen2MoeForCausalLM": Family("qwen3_moe", "QwenMoeModel", {"qkv_bias": True}),
    "MixtralForCausalLM": Family("mixtral", "MixtralModel"),
}

# transformers' modeling code for the architecture, run through tandem's paged attention
TRANSFORMERS = Family("transformers_backend", "TransformersModel")
MODEL_IMPLS = ("auto", "tandem", "transformers")

# Architectures tandem knows it must not run, with the reason.
REFUSED: dict[str, str] = {
    "Gemma3ForConditionalGeneration": "a multimodal Gemma 3 checkpoint (vision tower, image tokens): tandem runs "
                                      "Gemma 3 text-only checkpoints (Gemma3ForCausalLM, e.g. gemma-3-1b) and "
                                      "takes no image inputs",
}


def family_of(architectures: list[str]) -> tuple[str, Family]:
    """The first of a config's architectures that tandem implements natively, else the first
    ``*ForCausalLM`` one, for the transformers backend (checked when the worker loads it)."""
    for arch in architectures:
        if arch in ARCHITECTURES:
            return arch, ARCHITECTURES[arch]
        if arch in REFUSED:
            raise ValueError(f"{arch} is not supported: {REFUSED[arch]}")
    for arch in architectures:
        if arch.endswith("ForCausalLM"):
            return arch, TRANSFORMERS
    raise ValueError(f"unsupported architecture {architectures!r}; supported natively: {sorted(ARCHITECTURES)}, "
                     "and any decoder-only *ForCausalLM transformers implements (through the transformers backend)")


def implementation(architecture: str, model_impl: str = "auto") -> Family:
    """The family that runs ``architecture`` under ``model_impl`` (see the module's docstring)."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
    native = ARCHITECTURES.get(architecture)
    if model_impl == "transformers" or (model_impl == "auto" and native is None):
        return TRANSFORMERS
    if native is None:
        raise ValueError(f"unsupported architecture {architecture!r} with model_impl='tandem'; supported natively: "
                         f"{sorted(ARCHITECTURES)} (try --model-impl transformers: transformers' own modeling code "
                         "through tandem's paged attention)")
    return native


def model_class(architecture: str, model_impl: str = "auto") -> Any:
    """The model class that runs ``architecture``: a ``tandem.model.base.ModelLoader`` (not imported
    here, which would bring torch into the host side)."""
    family = implementation(architecture, model_impl)
    return getattr(importlib.import_module(f"tandem.model.models.{family.module}"), family.cls)
