"""The process groups of one tensor-parallel engine, and how a rank joins them.

Two groups, because two threads issue collectives: the *world* (NCCL for CUDA tensors, gloo for CPU
ones) carries the forward's collectives and each step's packed inputs, issued where the device runs
the step (the compute stream, or the CPU worker thread); the *control* group (gloo, CPU tensors)
carries what rank 0's host thread sends: the engine config and the start-up steps' builder at
start, the agreed KV cache size, and one small header per step."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.config import EngineConfig
from tandem.contract.startup import StartupSteps
from tandem.model.tp_layout import TPLayout
from tandem.parallel.env import RankEnv, confine_to_loopback, disable_multicast, meets_on_loopback
from tandem.switches import duration_s

logger = logging.getLogger(__name__)

#: followers wait for rank 0's next header as long as the engine stays idle
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def collective_timeout() -> datetime.timedelta:
    """Rendezvous and the forward's collectives (NCCL's watchdog aborts a rank stuck longer)."""
    return datetime.timedelta(seconds=duration_s("TANDEM_TP_TIMEOUT_S"))


def ready_key(rank: int) -> str:
    return f"tandem/tp-ready/{rank}"


@dataclass
class TPGroup:
    rank: int
    size: int
    local_rank: int
    control: dist.ProcessGroup
    owns_world: bool  # this engine initialised the default group (else torchrun's script did)

    @property
    def layout(self) -> TPLayout:
        return TPLayout(self.rank, self.size)

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def share_start(self, config: EngineConfig | None,
                    startup: StartupSteps | None) -> tuple[EngineConfig, StartupSteps]:
        """Rank 0's config and builder of start-up steps, on every rank (followers pass None): every
        rank must run the same synthetic steps, since they hold collectives. The builder travels
        pickled, as a reference to its class (it holds no state): a follower imports the host's
        builder when it unpickles it, while ``parallel/`` itself imports nothing of the engine."""
        box = [(dataclasses.asdict(config), startup) if config is not None else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        fields, startup = box[0]
        return EngineConfig(**fields), startup

    def finish(self, meet: bool = True, timeout_s: float = 60.0) -> None:
        """Meet every rank once more (nobody tears down while another still sends), then leave."""
        try:
            if meet:
                dist.barrier(group=self.control, async_op=True).wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            logger.warning("tensor-parallel rank %d: ranks did not all reach shutdown (%s)", self.rank, exc)
        if self.owns_world and dist.is_initialized():
            _bounded(dist.destroy_process_group, timeout_s)


def _bounded(fn: Callable[[], None], timeout_s: float) -> None:
    """Run ``fn`` in a daemon thread for at most ``timeout_s``: a teardown that hangs (NCCL's has, in
    some versions) is reported and left behind instead of blocking the engine's shutdown."""
    worker = threading.Thread(target=fn, name="tandem-tp-teardown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logger.warning("tensor-parallel process group teardown did not finish in %.0f s; left running", timeout_s)


def _backend() -> str:
    return "cpu:gloo,cuda:nccl" if dist.is_nccl_available() and torch.cuda.is_available() else "gloo"


def join(env: RankEnv, store: dist.Store | None = None) -> TPGroup:
    """Join (or, on rank 0 of a spawned group, host with ``store``) the group described by ``env``.
    A spawned group meets on loopback; torchrun's meets at its MASTER_ADDR:MASTER_PORT (``env://``),
    over the interfaces the user chose unless that address is loopback (one machine)."""
    disable_multicast()
    if meets_on_loopback(env):
        confine_to_loopback()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    owns = not dist.is_initialized()
    if owns:
        if store is None and env.spawned:
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                                  timeout=collective_timeout())
            store.set(ready_key(env.rank), "1")
        dist.init_process_group(_backend(), init_method=None if store is not None else "env://", store=store,
                                rank=env.rank, world_size=env.world_size, timeout=collective_timeout())
    if dist.get_world_size() != env.world_size:
        raise ValueError(f"the default process group has {dist.get_world_size()} ranks; tensor parallelism "
                         f"needs the whole group ({env.world_size})")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    logger.info("tensor-parallel rank %d/%d joined (%s)", env.rank, env.world_size, _backend())
    return TPGroup(env.rank, env.world_size, env.local_rank, control, owns)
