"""The engine's ``Worker`` for a tensor-parallel group: rank 0 of the group, in the engine's process.

``submit`` sends the step's header to the other ranks (an async gloo broadcast: the host does not
wait) and submits the step to rank 0's own executor, whose device broadcasts the packed inputs to
the other ranks' devices before running it. Every rank then computes the same step; only rank 0's
sampled tokens come back through ``collect``. Step timing and the idle fraction are rank 0's compute
stream (its collectives wait for the slowest rank, so its timeline is the group's)."""
from __future__ import annotations

import atexit
import dataclasses
import logging
from typing import Any

import torch

from tandem.config import EngineConfig
from tandem.contract.startup import StartupSteps
from tandem.contract.step import StepInputs, StepOutput
from tandem.contract.worker import StepInterval, WorkerInfo
from tandem.model.sources import resolve_model_config
from tandem.model.tp_layout import TPLayout
from tandem.parallel.control import ControlSender, Kind, Message
from tandem.parallel.env import rank_env
from tandem.parallel.group import TPGroup, join
from tandem.parallel.launch import Followers, start_local_group
from tandem.parallel.rank_worker import RankWorker, rank_config

logger = logging.getLogger(__name__)


def resolve_group_device(config: EngineConfig) -> EngineConfig:
    """Every rank takes its own GPU (``cuda:<local rank>``), so only a device type can be asked for."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r} with tensor_parallel_size={config.tensor_parallel_size}: each rank "
                         "uses cuda:<its local rank>; give device='cuda' (choose GPUs with CUDA_VISIBLE_DEVICES) "
                         "or 'cpu'")
    return dataclasses.replace(config, device=device)


def _start_group(config: EngineConfig) -> tuple[TPGroup, Followers | None]:
    """Join a torchrun-launched group, or start the other ranks on this machine."""
    n, env = config.tensor_parallel_size, rank_env()
    if env is not None and env.world_size > 1:
        if env.world_size != n or env.rank != 0:
            raise ValueError(f"launched as rank {env.rank} of {env.world_size} (torchrun), but "
                             f"tensor_parallel_size={n}: the group must be the whole world, driven by rank 0")
        return join(env), None
    if config.device == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"tensor_parallel_size={n} needs {n} GPUs on this machine, {torch.cuda.device_count()} "
                         "visible (several machines: launch with torchrun, see docs/tensor_parallel.md)")
    return start_local_group(n, fatal_on_loss=config.device == "cuda")


class TPWorker:
    running = 0  # in this process: the default process group is one per process

    def __init__(self, config: EngineConfig, startup: StartupSteps) -> None:
        if TPWorker.running:
            raise ValueError("a tensor-parallel engine is already running in this process: shut it down first "
                             "(llm.engine.shutdown())")
        config = resolve_group_device(config)
        layout = TPLayout(0, config.tensor_parallel_size, config.enable_expert_parallel)
        layout.check(resolve_model_config(config.model))  # before any process
        self.group, self.followers = _start_group(config)
        try:
            self.group.share_start(config, startup)
            self.rank = RankWorker(rank_config(config, self.group.local_rank), self.group, startup)
        except BaseException:
            self._abandon()
            raise
        self.sender = ControlSender(self.group.control)
        info = self.rank.info
        self.info: WorkerInfo = dataclasses.replace(
            info, device_name=f"{self.group.size} x {info.device_name} (tensor parallel)")
        self._closed = False
        TPWorker.running += 1
        atexit.register(self._shutdown_at_exit)  # keeps the group alive until shut down or exit

    def _abandon(self) -> None:
        """Start-up failed on this rank: the others cannot go on without it."""
        if self.followers is not None:
            self.followers.expect_exit()
            self.followers.stop(0)
        self.group.finish(meet=False)

    # --- the Worker interface ------------------------------------------------------------------
    def submit(self, step: StepInputs) -> Any:
        self.sender.send(Message.step(step))  # first: the followers launch while rank 0 does
        return self.rank.submit(step)

    def mask_buffer(self, step_id: int, rows: int, words: int) -> Any:
        return None  # the mask also goes to the other ranks: the host's own array

    def provide_mask(self, step_id: int, mask: Any) -> None:
        self.sender.send_mask(step_id, mask)  # every rank samples the same tokens
        self.rank.provide_mask(step_id, mask)

    def collect(self, handle: Any) -> StepOutput:
        return self.rank.collect(handle)

    def set_async(self, enabled: bool) -> None:
        self.sender.send(Message(Kind.SET_ASYNC, num_words=int(enabled)))
        self.rank.set_async(enabled)

    def drain(self) -> None:
        self.sender.send(Message(Kind.DRAIN))  # a step waiting for its mask is sampled on every rank
        self.rank.drain()  # rank 0's steps end only once every rank has joined their collectives

    def start_timing(self) -> None:
        self.rank.start_timing()

    def stop_timing(self) -> list[StepInterval]:
        return self.rank.stop_timing()

    def idle_fraction(self) -> float | None:
        return self.rank.idle_fraction()

    def device_seconds(self) -> tuple[float, float]:
        return self.rank.device_seconds()

    def pause_device_clock(self) -> None:
        self.rank.pause_device_clock()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        TPWorker.running -= 1
        atexit.unregister(self._shutdown_at_exit)
        if self.followers is not None:
            self.followers.expect_exit()
        try:
            self.sender.send(Message(Kind.STOP))
            self.sender.flush()
            intact = True
        except RuntimeError as exc:  # a rank died: clean up this side, stop the rest
            logger.warning("tensor-parallel group broken at shutdown: %s", exc)
            intact = False
        self.rank.shutdown()
        self.rank.release_graphs()
        self.group.finish(meet=intact)
        if self.followers is not None:
            self.followers.stop(60.0 if intact else 0.0)

    def _shutdown_at_exit(self) -> None:
        """The followers stop cleanly even when the engine was never shut down (a script's end)."""
        try:
            self.shutdown()
        except Exception as exc:  # the interpreter is exiting: report, never raise here
            logger.warning("tensor-parallel shutdown at exit failed: %s", exc)
