"""One rank's device side: a ``DeviceWorker`` that loads only its shards, agrees with the other ranks
on the KV cache size, and runs steps through executors that receive each step from rank 0.

Every rank runs the same start-up in the same order (load, profile, size the cache, capture graphs),
since the profiled steps and the graph warm-ups contain collectives; the steps come from the same
builder on every rank (rank 0's, shared with the config: ``TPGroup.share_start``). The KV cache
size is the minimum over ranks, so every rank derives the same block count and max_model_len."""
from __future__ import annotations

import dataclasses

import torch.distributed as dist

from tandem.config import EngineConfig
from tandem.contract.startup import StartupSteps
from tandem.model.base import CausalLM
from tandem.model.loader import load_model
from tandem.model.sources import resolve_model_config
from tandem.model.tp_ops import TensorParallelOps
from tandem.parallel.executors import make_rank_executor
from tandem.parallel.group import TPGroup
from tandem.worker.executor import Executor
from tandem.worker.worker import DeviceWorker


def rank_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """The engine config as one rank runs it: GPU ``local_rank`` of its machine (or the CPU)."""
    device = f"cuda:{local_rank}" if config.device == "cuda" else "cpu"
    return dataclasses.replace(config, device=device)


class RankWorker(DeviceWorker):
    def __init__(self, config: EngineConfig, group: TPGroup, startup: StartupSteps) -> None:
        self.group = group
        super().__init__(config, startup)

    def _load_model(self, max_positions: int) -> CausalLM:
        c = self.config
        layout = dataclasses.replace(self.group.layout, expert_parallel=c.enable_expert_parallel)
        comm = TensorParallelOps(dist.group.WORLD, layout, resolve_model_config(c.model))
        comm.use_one_shot(self.device, self.dtype)
        return load_model(c.model, self.device, self.dtype, max_positions, c.seed, layout, comm, c.model_impl,
                          c.quantization)

    def _plan_kv_blocks(self, max_positions: int) -> int:
        return self.group.min_over_ranks(super()._plan_kv_blocks(max_positions))

    def _make_executor(self, async_batching: bool) -> Executor:
        return make_rank_executor(self.runner, async_batching, self.config.max_num_seqs, self.graphs, self.piecewise)

    def release_graphs(self) -> None:
        """Free the captured graphs: NCCL communicators they captured cannot be destroyed before."""
        graphs = list(self.graphs.graphs.values()) if self.graphs else []
        for g in graphs:
            g.graph.reset()
        for bucket in self.piecewise.buckets.values() if self.piecewise else ():
            for graph in bucket.graphs:
                graph.reset()
        self.graphs = self.piecewise = None
