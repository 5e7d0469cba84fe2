"""The engine: owns requests, drives schedule -> build -> execute -> process, emits outputs.

One loop serves both executors. After submitting step N it processes the oldest outstanding step
once more than ``executor.depth`` are in flight: depth 0 is synchronous; depth 1 lets the device run
step N while the host processes step N-1 and plans step N+1."""
from __future__ import annotations

import gc
import logging
import random
import time
from collections import deque
from typing import Any

import torch

from tandem.config import EngineConfig
from tandem.engine.batch import build_step
from tandem.engine.block_manager import BlockManager, SlotPool
from tandem.engine.executor import Executor, SyncExecutor, ThreadExecutor
from tandem.engine.kv_cache import allocate_kv_cache, plan_num_blocks
from tandem.engine.model_runner import ModelRunner
from tandem.engine.output_processor import append_token, request_output
from tandem.engine.profile import profile_peak_memory
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.step_log import StepLog
from tandem.engine.sequence import Sequence
from tandem.model.registry import load_model
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        loaded = load_model(config.model, config.device, config.dtype, config.max_model_len, config.seed)
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        requested_len = loaded.model.max_positions
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        peak = profile_peak_memory(loaded.model, config, requested_len) if config.device.type == "cuda" else 0
        num_blocks = plan_num_blocks(config, self.model_config, peak)
        self.max_model_len = self._fit_max_model_len(requested_len, (num_blocks - 1) * config.block_size)
        kv_cache = allocate_kv_cache(self.model_config, num_blocks, config.block_size, config.device, config.dtype)
        num_slots = 2 * config.max_num_seqs  # sequences that left the batch keep theirs one more step
        self.runner = ModelRunner(loaded.model, kv_cache, config.block_size, num_slots + 1)  # +1: padding rows
        self.graphs = self._capture_graphs(num_slots) if config.use_cuda_graphs else None
        self.executor: Executor = self._make_executor()
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens,
                                   BlockManager(num_blocks, config.block_size), SlotPool(num_slots))
        self.seqs: dict[str, Sequence] = {}
        self.in_flight: deque[tuple[SchedulerOutput, Any]] = deque()
        self._seed_rng = random.Random(config.seed)
        gc.collect()
        gc.freeze()  # start-up objects leave the collector's view: full collections stay short in the loop
        self.step_log: StepLog | None = None  # set by benchmarks

    def _fit_max_model_len(self, requested: int, kv_tokens: int) -> int:
        if requested <= kv_tokens:
            return requested
        if self.config.max_model_len is not None:
            raise ValueError(f"max_model_len={requested} does not fit the KV cache ({kv_tokens} tokens); "
                             "lower max_model_len or give the cache more memory")
        logger.warning("max_model_len lowered from %d to %d to fit the KV cache", requested, kv_tokens)
        return kv_tokens

    def _capture_graphs(self, dummy_slot: int):
        from tandem.engine.cuda_graphs import DecodeGraphs

        max_blocks = -(-self.max_model_len // self.config.block_size)
        graphs = DecodeGraphs(self.runner, self.config.max_num_seqs, max_blocks, dummy_slot)
        graphs.capture(torch.cuda.Stream(self.config.device))
        return graphs

    def set_async_batching(self, enabled: bool) -> None:
        """Swap executors between runs (benchmarks compare both on one loaded model)."""
        if self.has_unfinished_requests():
            raise RuntimeError("cannot switch executors while requests are running")
        self.executor.shutdown()
        self.config.async_batching = enabled
        self.executor = self._make_executor()

    def _make_executor(self) -> Executor:
        depth = 1 if self.config.async_batching else 0
        if self.config.device.type == "cuda":
            from tandem.engine.executor_cuda import StreamExecutor

            return StreamExecutor(self.runner, depth, self.config.max_num_seqs, self.graphs)
        return ThreadExecutor(self.runner) if depth else SyncExecutor(self.runner)

    # --- requests --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "no room left to generate")
        return ids

    def make_sequence(self, request_id: str, prompt: str | None, params: SamplingParams,
                      prompt_token_ids: list[int] | None = None, stream: bool = False) -> Sequence:
        """Validate a request without touching engine state (so a batch can be checked up front)."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if params.stop_strings and (not params.detokenize or self.tokenizer is None):
            raise ValueError("stop strings need detokenize=True and a model with a tokenizer")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        room = self.max_model_len - len(ids)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        detok = (IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                 if params.detokenize and self.tokenizer is not None else None)
        seed = 0 if params.seed is None else params.seed & (2**63 - 1)  # unseeded: drawn when added
        return Sequence(request_id, ids, params, seed, max_new, prompt=prompt, detokenizer=detok, stream=stream)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.params.seed is None:
            seq.seed = self._seed_rng.getrandbits(63)  # reproducible for a given engine seed and order
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, stream: bool = False) -> None:
        """Queue a request. ``step()`` returns its output when it finishes, and after every step
        that adds a token if ``stream`` is set. Raises ValueError (and changes nothing) if invalid."""
        self.add_sequence(self.make_sequence(request_id, prompt, params, prompt_token_ids, stream))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return None
        self.scheduler.finish(seq, "abort")
        return request_output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    # --- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan and launch one step; return outputs (finished requests, and streaming ones that got a
        token) of whichever step completed meanwhile."""
        t_begin = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.items:
            t_sched = time.perf_counter()
            step = build_step(sched, self.config.block_size, self.executor.padding_for(sched))
            t_built = time.perf_counter()
            self.in_flight.append((sched, self.executor.submit(step)))
            if self.step_log is not None:
                self.step_log.add(sched, t_begin, t_sched, t_built, time.perf_counter())
        outputs: list[RequestOutput] = []
        while self.in_flight and (len(self.in_flight) > self.executor.depth or not sched.items):
            done, handle = self.in_flight.popleft()
            t0 = time.perf_counter()
            tokens = self.executor.collect(handle)
            t1 = time.perf_counter()
            outputs.extend(self._process(done, tokens))
            if self.step_log is not None:
                self.step_log.processed(done.step_id, t0, t1, time.perf_counter())
        return outputs

    def _process(self, sched: SchedulerOutput, tokens: list[int]) -> list[RequestOutput]:
        self.scheduler.step_done(sched.step_id)
        outputs = []
        sampled = (item.seq for item in sched.items if item.sample)
        for seq, token in zip(sampled, tokens):
            seq.num_pending -= 1
            if seq.finished:
                continue  # finished a step earlier: this token was computed speculatively
            reason = append_token(seq, token, self.eos_token_ids)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self.seqs.pop(seq.request_id, None)
            if reason is not None or seq.stream:
                outputs.append(request_output(seq))
        return outputs

    def shutdown(self) -> None:
        while self.in_flight:
            sched, handle = self.in_flight.popleft()
            self.executor.collect(handle)
            self.scheduler.step_done(sched.step_id)
        self.executor.shutdown()

    def release_device_memory(self) -> None:
        """Drop the KV cache and executor (the engine cannot run afterwards); weights stay."""
        self.shutdown()
        self.runner.kv_cache = None
        self.executor = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def device(self) -> torch.device:
        return self.config.device
