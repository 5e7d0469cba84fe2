"""Measure peak activation memory with one worst-case step, so the KV cache can take the rest."""
from __future__ import annotations

import torch

from tandem.config import EngineConfig
from tandem.engine.batch import Padding, StepInputs, build_step
from tandem.engine.kv_cache import allocate_kv_cache
from tandem.engine.model_runner import ModelRunner
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.model.llama import LlamaModel
from tandem.sampling_params import SamplingParams


def dummy_step(num_tokens: int, block_size: int, vocab_size: int) -> SchedulerOutput:
    """One sequence prefilling ``num_tokens`` random tokens into blocks 1..n."""
    ids = torch.randint(0, vocab_size, (num_tokens,)).tolist()
    seq = Sequence("profile", ids, SamplingParams(temperature=1.0, top_p=0.9), seed=0, max_new_tokens=1)
    seq.block_ids = list(range(1, -(-num_tokens // block_size) + 1))
    seq.slot = 0
    return SchedulerOutput(0, [ScheduledSeq(seq, 0, num_tokens, True, 0)])


def dummy_decode_step(batch: int, random: bool, pad: Padding, block_size: int) -> StepInputs:
    """A decode step of one sequence in reserved block 0, padded to ``batch`` rows (for capture)."""
    params = SamplingParams(temperature=1.0, top_k=5) if random else SamplingParams(temperature=0.0)
    seq = Sequence("capture", [1], params, seed=0, max_new_tokens=1)
    seq.block_ids, seq.slot = [0], pad.dummy_slot
    return build_step(SchedulerOutput(-1, [ScheduledSeq(seq, 0, 1, True, 0)]), block_size, pad)


def profile_peak_memory(model: LlamaModel, config: EngineConfig, max_model_len: int) -> int:
    num_tokens = min(config.max_num_batched_tokens, max_model_len)
    sched = dummy_step(num_tokens, config.block_size, model.config.vocab_size)
    num_blocks = len(sched.items[0].seq.block_ids) + 1
    cache = allocate_kv_cache(model.config, num_blocks, config.block_size, config.device, config.dtype)
    runner = ModelRunner(model, cache, config.block_size, num_slots=1)
    torch.cuda.synchronize(config.device)
    torch.cuda.reset_peak_memory_stats(config.device)
    step = build_step(sched, config.block_size)
    runner.run(torch.from_numpy(step.data).to(config.device), step)
    torch.cuda.synchronize(config.device)
    peak = torch.cuda.max_memory_allocated(config.device)
    del cache, runner
    torch.cuda.empty_cache()
    return peak
