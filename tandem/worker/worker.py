"""The device side of the engine on one device: loads the model, sizes and allocates the KV cache,
captures CUDA graphs, and runs steps through an executor (sync or async). Implements the ``Worker``
interface (``contract.worker``); the synthetic steps of its start-up come from the host's builder
(``contract.startup``), which ``tandem.runtime`` hands to it."""
from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING

import torch

from tandem.config import EngineConfig
from tandem.contract.startup import StartupSteps
from tandem.contract.step import StepInputs, StepOutput
from tandem.contract.worker import StepInterval, WorkerInfo
from tandem.model.model_config import requested_max_model_len
from tandem.model.sources import resolve_model_config
from tandem.model.loader import load_model
from tandem.model.tp_layout import TPLayout
from tandem.switches import flag
from tandem.worker.device import device_name, resolve_device, resolve_dtype
from tandem.worker.draft_graphs import DraftGraphs, DraftModel
from tandem.worker.draft_plan import DraftPlanner
from tandem.worker.draft_window import DeviceDraft
from tandem.worker.executor import Executor, SyncExecutor, ThreadExecutor
from tandem.worker.grammar_mask import pin_host_memory
from tandem.worker.kv_cache import allocate_kv_cache, plan_num_blocks, resolve_kv_dtype
from tandem.worker.memory import profile_activations
from tandem.worker.model_runner import ModelRunner
from tandem.worker.piecewise_graphs import PiecewiseGraphs, token_buckets
from tandem.worker.warm_up import warm_up_kernels

if TYPE_CHECKING:
    from tandem.model.base import CausalLM
    from tandem.worker.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)


def fit_max_model_len(requested: int, kv_tokens: int, explicit: bool) -> int:
    if requested <= kv_tokens:
        return requested
    if explicit:
        raise ValueError(f"max_model_len={requested} does not fit the KV cache ({kv_tokens} tokens); "
                         "lower max_model_len or give the cache more memory")
    logger.warning("max_model_len lowered from %d to %d to fit the KV cache", requested, kv_tokens)
    return kv_tokens


class DeviceWorker:
    def __init__(self, config: EngineConfig, startup: StartupSteps) -> None:
        self.config = config
        self.startup = startup
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype, self.device)
        model_config = resolve_model_config(config.model)
        max_positions = requested_max_model_len(model_config, config.max_model_len, config.allow_long_max_model_len)
        self.model = self._load_model(max_positions)
        self.draft = self._load_draft(max_positions)  # before the plan: its weights are not KV memory
        num_blocks = self._plan_kv_blocks(max_positions)
        max_model_len = fit_max_model_len(max_positions, (num_blocks - 1) * config.block_size,
                                          explicit=config.max_model_len is not None)
        # the model's own config: under tensor parallelism it holds only this rank's KV heads
        kv_cache = allocate_kv_cache(self.model.kv_spec, num_blocks, config.block_size, self.device, self.kv_dtype)
        num_rows = self.num_rows
        self.runner = ModelRunner(self.model, kv_cache, config.block_size, num_rows + 1,  # +1: padding rows
                                  max_model_len, speculative=config.speculative is not None)
        graph_max_blocks = -(-max_model_len // config.block_size)
        self.graphs, self.piecewise = self._capture_graphs(graph_max_blocks, num_rows)
        if self.device.type == "cuda":
            start = time.perf_counter()
            warm_up_kernels(self.model, startup, config.block_size, self.kv_dtype)
            logger.info("kernel warm-up: %.2f s", time.perf_counter() - start)
        self.info = WorkerInfo(
            device=str(self.device), device_name=device_name(self.device), dtype=str(self.dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
            num_kv_blocks=num_blocks, block_size=config.block_size, max_model_len=max_model_len, num_rows=num_rows,
            padding_row=num_rows, graph_batch_sizes=self.graphs.sizes if self.graphs else (),
            graph_max_blocks=graph_max_blocks, graph_token_buckets=self.piecewise.sizes if self.piecewise else ())
        self._executor = self._make_executor(config.async_batching)

    @property
    def num_rows(self) -> int:
        return 2 * self.config.max_num_seqs  # sequences that left the batch keep theirs one more step

    def _load_model(self, max_positions: int) -> CausalLM:
        c = self.config
        return load_model(c.model, self.device, self.dtype, max_positions, c.seed,
                          TPLayout(expert_parallel=c.enable_expert_parallel), model_impl=c.model_impl,
                          quantization=c.quantization)

    def _plan_kv_blocks(self, max_positions: int) -> int:
        c = self.config
        reserved = 0
        if self.device.type == "cuda":
            graph_blocks = -(-max_positions // c.block_size) if self._wants_graphs() else None
            piecewise_tokens = min(c.max_num_batched_tokens, token_buckets()[-1]) if graph_blocks else 0
            peaks = profile_activations(self.model, self.startup, c.max_num_batched_tokens, c.max_num_seqs,
                                        max_positions, c.block_size, graph_blocks, piecewise_tokens)
            rows = ModelRunner.state_bytes(self.num_rows + 1, max_positions,  # allocated after the cache
                                           speculative=c.speculative is not None)
            reserved = peaks.total + rows
            logger.info("profiled activations: worst eager step %.2f GiB, largest decode graph %.2f GiB; "
                        "per-row state %.2f GiB", peaks.eager_bytes / 2**30, peaks.graph_bytes / 2**30, rows / 2**30)
        num_blocks = plan_num_blocks(c.kv_cache_tokens, c.block_size, c.gpu_memory_utilization, self.model.kv_spec,
                                     self.device, self.kv_dtype, reserved)
        if self.draft is not None and c.kv_cache_tokens is None and self.device.type == "cuda":
            # the draft's cache holds as many tokens as the target's: the memory is shared out by bytes
            target, draft = (m.kv_spec.bytes_per_token(self.kv_dtype) for m in (self.model, self.draft))
            num_blocks = max(2, (num_blocks - 1) * target // (target + draft) + 1)
        return num_blocks

    def _load_draft(self, max_positions: int) -> CausalLM | None:
        spec = self.config.speculative
        if spec is None or spec.method != "draft":
            return None
        draft = load_model(spec.model, self.device, self.dtype, max_positions, self.config.seed)
        if draft.config.vocab_size < self.model.config.vocab_size - 1024:  # padded vocabularies differ a little
            raise ValueError(f"speculative_config: the draft model {spec.model!r} has a vocabulary of "
                             f"{draft.config.vocab_size} tokens, the target {self.model.config.vocab_size}: "
                             "a draft must share the target's tokenizer")
        return draft

    def draft_proposer(self, spec: object) -> DraftPlanner:
        """The proposer of ``speculative_config`` method 'draft' (its model was loaded at start): the
        host's planner, and the device's part, which proposes as the first op of each step that
        verifies its proposals (``worker.draft_window``)."""
        if self.draft is None:
            raise ValueError("speculative_config: this worker was started without a draft model")
        cache = allocate_kv_cache(self.draft.kv_spec, self.info.num_kv_blocks, self.config.block_size, self.device,
                                  self.kv_dtype)
        draft = DraftModel(self.draft, cache, self.config.block_size, self.model.config.vocab_size)
        graphs = None
        if self._wants_graphs() and getattr(self.draft, "supports_cuda_graphs", True):
            # graphs up to the most rows that speculate together (more running + waiting: none does)
            max_seqs = min(getattr(spec, "disable_by_batch_size", self.config.max_num_seqs), self.config.max_num_seqs)
            graphs = DraftGraphs(draft, max_seqs, -(-self.info.max_model_len // self.config.block_size))
            graphs.capture_all(spec.k)
        k = spec.k
        self.runner.spec_lag.keep_draws(k + 1)
        self.runner.draft = DeviceDraft(draft, k, graphs)
        return DraftPlanner(k, self.info.num_kv_blocks, self.config.block_size, graphs)

    def _wants_graphs(self) -> bool:
        # a model whose forward cannot be captured (the transformers backend may say so) runs eagerly
        return (self.config.use_cuda_graphs and self.device.type == "cuda"
                and getattr(self.model, "supports_cuda_graphs", True))

    def _capture_graphs(self, max_blocks: int, padding_row: int) -> tuple[DecodeGraphs | None, PiecewiseGraphs | None]:
        if not self._wants_graphs():
            return None, None
        from tandem.worker.cuda_graphs import DecodeGraphs

        stream = torch.cuda.Stream(self.device)
        graphs = DecodeGraphs(self.runner, self.config.max_num_seqs, max_blocks, padding_row)
        graphs.capture(stream, self.startup)
        piecewise = None
        if PiecewiseGraphs.applies(self.model, self.device) and flag("TANDEM_PIECEWISE"):
            piecewise = PiecewiseGraphs(self.runner, self.config.max_num_batched_tokens, graphs.pool)
            piecewise.capture(stream)
        return graphs, piecewise

    def _make_executor(self, async_batching: bool) -> Executor:
        if self.device.type == "cuda":
            from tandem.worker.stream_executor import StreamExecutor

            return StreamExecutor(self.runner, not async_batching, self.config.max_num_seqs, self.graphs,
                                  self.piecewise)
        return ThreadExecutor(self.runner) if async_batching else SyncExecutor(self.runner)

    # --- the Worker interface ------------------------------------------------------------------
    def submit(self, step: StepInputs):
        return self._executor.submit(step)

    def mask_buffer(self, step_id: int, rows: int, words: int):
        return self._executor.mask_buffer(step_id, rows, words)

    def provide_mask(self, step_id: int, mask) -> None:
        self._executor.provide_mask(step_id, mask)

    def pin_host_memory(self, array):
        """Page-lock memory the host fills masks in (grammar workers' shared rows) so that the mask's
        copy reads it in place; returns the call that releases it, or None (not CUDA, or refused)."""
        return pin_host_memory(array) if self.device.type == "cuda" else None

    def collect(self, handle) -> StepOutput:
        return self._executor.collect(handle)

    def set_async(self, enabled: bool) -> None:
        self._executor.shutdown()
        self._executor = self._make_executor(enabled)

    def drain(self) -> None:
        self._executor.drain()

    def start_timing(self) -> None:
        self._executor.start_timing()

    def stop_timing(self) -> list[StepInterval]:
        return self._executor.stop_timing()

    def idle_fraction(self) -> float | None:
        return self._executor.times.idle_fraction()

    def device_seconds(self) -> tuple[float, float]:
        times = self._executor.times
        return times.busy_s, times.idle_s

    def pause_device_clock(self) -> None:
        self._executor.times.pause()

    def shutdown(self) -> None:
        self._executor.shutdown()

    def release_memory(self) -> None:
        """Drop the KV cache, graphs and executor (the worker cannot run afterwards); weights stay."""
        self.shutdown()
        self.runner.kv_cache = None
        self.graphs = None
        self._executor = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
