"""The offline Python API, in vLLM's shape: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from tandem.config import EngineConfig, default_device, parse_dtype
from tandem.engine.llm_engine import LLMEngine
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams

import torch

PromptList = str | list[str] | list[list[int]]


class LLM:
    def __init__(self, model: str, *, dtype: str | torch.dtype | None = None, device: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9, kv_cache_tokens: int | None = None,
                 seed: int = 0, async_batching: bool = True, cuda_graphs: bool = True,
                 enforce_eager: bool = False) -> None:
        dev = torch.device(device) if device else default_device()
        config = EngineConfig(model=model, device=dev, dtype=parse_dtype(dtype, dev), max_model_len=max_model_len,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                              kv_cache_tokens=kv_cache_tokens, seed=seed, async_batching=async_batching,
                              cuda_graphs=cuda_graphs and not enforce_eager)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptList, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        items = _normalise_prompts(prompts)
        params = _normalise_params(sampling_params, len(items))
        seqs = [self.engine.make_sequence(str(next(self._ids)), text, p, ids)
                for (text, ids), p in zip(items, params)]
        return self._run(seqs, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the checkpoint's chat template (with the generation prompt) and generate."""
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        ids = [self.engine.tokenizer.apply_chat_template(conv) for conv in conversations]
        return self.generate(ids, sampling_params, use_tqdm)

    def _run(self, seqs: list, use_tqdm: bool) -> list[RequestOutput]:
        for seq in seqs:
            self.engine.add_sequence(seq)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(seqs), desc="generate", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for seq in seqs:
                self.engine.abort_request(seq.request_id)
            self.engine.shutdown()
            raise
        finally:
            bar.close()
        return [results[seq.request_id] for seq in seqs]


def _normalise_prompts(prompts: PromptList) -> list[tuple[str | None, list[int] | None]]:
    if isinstance(prompts, str):
        return [(prompts, None)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a non-empty list of strings, or a list of token-id lists")
    return [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompts]


def _normalise_params(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params
