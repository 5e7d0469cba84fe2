"""Choosing the worker: the one place above the engine (host) and the worker (device) that knows
both. It builds the device side a config asks for (one device, or a tensor-parallel group whose
rank 0 drives from this process) and hands it the engine's builder of start-up steps."""
from __future__ import annotations

from tandem.config import EngineConfig
from tandem.contract.worker import Worker
from tandem.engine.startup_steps import StartupStepBuilder
from tandem.switches import check_switches


def create_worker(config: EngineConfig) -> Worker:
    check_switches()  # before the model loads: a mistyped switch fails now, naming itself
    startup = StartupStepBuilder()
    if config.tensor_parallel_size > 1:  # a group of ranks, this process driving as rank 0
        from tandem.parallel.tp_worker import TPWorker

        return TPWorker(config, startup)
    from tandem.worker.worker import DeviceWorker

    return DeviceWorker(config, startup)
