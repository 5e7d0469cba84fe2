"""Start-up warm-up: every kernel variant a step may need is compiled before the first request.

Triton compiles a kernel the first time it meets a new combination of its compile-time constants;
in the middle of serving that is a stall of a second or more for the whole batch. The profiled
worst-case step and graph capture compile most variants; the host's warm-up steps
(``StartupSteps.warm_up``: the attention kernel's query tile sizes, the sampling stage's paths)
compile the rest. They run here on a private runner with its own small KV cache, so the engine's
state is untouched."""
from __future__ import annotations

import torch

from tandem.contract.startup import StartupSteps
from tandem.model.base import CausalLM
from tandem.worker.kv_cache import allocate_kv_cache
from tandem.worker.memory import blocks_used
from tandem.worker.model_runner import ModelRunner


def warm_up_kernels(model: CausalLM, steps: StartupSteps, block_size: int,
                    kv_dtype: torch.dtype | None = None) -> None:
    """Run the warm-up steps eagerly on ``model``'s device and wait for them (over a cache of
    ``kv_dtype``, default the model's: the kernels compile per cache element type)."""
    warm_up = steps.warm_up(block_size, model.config.vocab_size)
    longest = max(s.shape.num_tokens for s in warm_up)
    num_blocks = max(blocks_used(s) for s in warm_up)  # each step's blocks start at 1
    cache = allocate_kv_cache(model.kv_spec, num_blocks, block_size, model.device, kv_dtype or model.dtype)
    runner = ModelRunner(model, cache, block_size, num_rows=longest + 1, max_model_len=longest)
    for step in warm_up:
        runner.run(torch.from_numpy(step.data).to(model.device), step.shape, step.sampler)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
