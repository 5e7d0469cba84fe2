"""One entry point from a model name (checkpoint folder or ``random:<preset>``) to a runnable model."""
from __future__ import annotations

from pathlib import Path

import torch

from tandem.model.llama import LlamaModel
from tandem.model.loader import assemble_weights, load_checkpoint_weights, random_getter
from tandem.model.sources import is_preset, resolve_model_config


def load_model(source: str, device: torch.device, dtype: torch.dtype, max_positions: int,
               seed: int = 0) -> LlamaModel:
    """Weights on ``device``; rotary tables cover ``max_positions`` positions."""
    config = resolve_model_config(source)
    if is_preset(source):
        weights = assemble_weights(config, random_getter(device, dtype, seed))
    else:
        weights = load_checkpoint_weights(Path(source), config, device, dtype)
    return LlamaModel(config, weights, max_positions)
