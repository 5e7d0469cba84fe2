"""Synthetic steps for start-up: the worst-case step whose peak activation memory sizes the KV cache,
and the decode steps that CUDA graphs are captured from."""
from __future__ import annotations

import torch

from tandem.engine.batch import Padding, build_step
from tandem.engine.scheduler import ScheduledSeq, SchedulerOutput
from tandem.engine.sequence import Sequence
from tandem.engine.step import StepInputs
from tandem.model.llama import LlamaModel
from tandem.sampling_params import SamplingParams
from tandem.worker.kv_cache import allocate_kv_cache
from tandem.worker.model_runner import ModelRunner


def prefill_step(num_tokens: int, block_size: int, vocab_size: int) -> StepInputs:
    """One sequence prefilling ``num_tokens`` random tokens into blocks 1..n, sampled with top-p."""
    ids = torch.randint(0, vocab_size, (num_tokens,)).tolist()
    seq = Sequence("profile", ids, SamplingParams(temperature=1.0, top_p=0.9), seed=0, max_new_tokens=1)
    seq.block_ids, seq.row = list(range(1, -(-num_tokens // block_size) + 1)), 0
    return build_step(SchedulerOutput(0, [ScheduledSeq(seq, 0, num_tokens, True, 0)]), block_size)


def decode_step(random: bool, pad: Padding, block_size: int) -> StepInputs:
    """A decode step of one sequence in reserved block 0, padded to ``pad.num_seqs`` rows (for capture)."""
    params = SamplingParams(temperature=1.0, top_k=5) if random else SamplingParams(temperature=0.0)
    seq = Sequence("capture", [1], params, seed=0, max_new_tokens=1)
    seq.block_ids, seq.row = [0], pad.padding_row
    return build_step(SchedulerOutput(-1, [ScheduledSeq(seq, 0, 1, True, 0)]), block_size, pad)


def profile_peak_memory(model: LlamaModel, num_tokens: int, block_size: int) -> int:
    """Peak bytes allocated while running a ``num_tokens``-token prefill step."""
    device = model.device
    step = prefill_step(num_tokens, block_size, model.config.vocab_size)
    cache = allocate_kv_cache(model.config, step.shape.max_blocks + 1, block_size, device, model.dtype)
    runner = ModelRunner(model, cache, block_size, num_rows=1)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.run(torch.from_numpy(step.data).to(device), step.shape, step.sampler)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del cache, runner
    torch.cuda.empty_cache()
    return peak
