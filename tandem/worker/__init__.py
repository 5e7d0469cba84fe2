"""The device side: model weights, KV cache, CUDA graphs, executors, the model runner, the sampler."""
from __future__ import annotations

from tandem.config import EngineConfig
from tandem.engine.worker_api import Worker


def create_worker(config: EngineConfig) -> Worker:
    if config.tensor_parallel_size > 1:  # a group of ranks, this process driving as rank 0
        from tandem.parallel.tp_worker import TPWorker

        return TPWorker(config)
    from tandem.worker.worker import DeviceWorker

    return DeviceWorker(config)
