"""Start-up warm-up: every kernel variant a step may need is compiled before the first request.

Triton compiles a kernel the first time it meets a new combination of its compile-time constants
(and of its arguments' specialisations: see ``engine.step.field_offsets`` for the alignment of the
step's fields); in the middle of serving that is a stall of a second or more for the whole batch.
The profiled worst-case step and graph capture compile most variants; these few tiny eager steps
compile the rest: the attention kernel's query-tile sizes
(short and long chunks) and the sampling stage's paths (top-k, top-p, min-p, penalties, logprobs,
prompt logprobs). They run on a private runner with its own small KV cache, so the engine's state
is untouched."""
from __future__ import annotations

import torch

from tandem.engine.batch import build_step
from tandem.engine.plan import ScheduledSeq, SchedulerOutput
from tandem.model.base import CausalLM
from tandem.sampling_params import SamplingParams
from tandem.worker.kv_cache import allocate_kv_cache
from tandem.worker.memory import synthetic_sequence
from tandem.worker.model_runner import ModelRunner

#: (chunk lengths of one step, how every sequence of it samples); the chunk lengths span the query
#: tile sizes (tokens x query heads per KV head: 16, 32, 64 rows) for any GQA group
WARM_UP_STEPS: tuple[tuple[tuple[int, ...], SamplingParams], ...] = (
    ((2, 1), SamplingParams(temperature=1.0, top_k=20)),
    ((4, 3), SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5)),
    ((8, 1), SamplingParams(temperature=0.0, logprobs=3)),
    ((16, 2), SamplingParams(temperature=0.7, min_p=0.1, repetition_penalty=1.1, frequency_penalty=0.2)),
    ((32, 5), SamplingParams(temperature=1.0, top_k=5, top_p=0.8, logprobs=1)),
    ((64, 7), SamplingParams(temperature=0.0, prompt_logprobs=2)),
)


def warm_up_kernels(model: CausalLM, block_size: int) -> None:
    """Run ``WARM_UP_STEPS`` eagerly on ``model``'s device and wait for them."""
    longest = max(sum(lens) for lens, _ in WARM_UP_STEPS)
    num_blocks = 1 + sum(-(-n // block_size) for lens, _ in WARM_UP_STEPS for n in lens)
    cache = allocate_kv_cache(model.kv_spec, num_blocks, block_size, model.device, model.dtype)
    runner = ModelRunner(model, cache, block_size, num_rows=longest + 1, max_model_len=longest)
    for lens, params in WARM_UP_STEPS:
        items, block = [], 1
        for i, n in enumerate(lens):
            seq = synthetic_sequence(f"warm-up-{i}", n, model.config.vocab_size, params, block, block_size)
            seq.row = i
            block += len(seq.block_ids)
            item = ScheduledSeq(seq, 0, n, True, 0)
            if params.prompt_logprobs is not None:
                item.plp_stop = n - 1
            items.append(item)
        step = build_step(SchedulerOutput(0, items), block_size)
        runner.run(torch.from_numpy(step.data).to(model.device), step.shape, step.sampler)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
