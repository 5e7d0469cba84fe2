"""One entry point from a model name (checkpoint folder or ``random:<preset>``) to a runnable model."""
from __future__ import annotations

from pathlib import Path

import torch

from tandem.model.llama import LlamaModel
from tandem.model.loader import assemble_weights, load_checkpoint_weights, random_getter
from tandem.model.sources import is_preset, resolve_model_config
from tandem.model.tp_layout import TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps


def load_model(source: str, device: torch.device, dtype: torch.dtype, max_positions: int,
               seed: int = 0, tp: TPLayout = TPLayout(), comm: SingleDevice | TensorParallelOps | None = None
               ) -> LlamaModel:
    """Weights on ``device``; rotary tables cover ``max_positions`` positions. Under tensor parallelism
    (``tp.size > 1``, with ``comm`` the group's collectives) only rank ``tp.rank``'s shards."""
    config = resolve_model_config(source)
    tp.check(config)
    if is_preset(source):
        weights = assemble_weights(config, random_getter(device, dtype, seed), tp)
    else:
        weights = load_checkpoint_weights(Path(source), config, device, dtype, tp)
    return LlamaModel(tp.local_config(config), weights, max_positions, comm)
