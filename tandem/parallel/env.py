"""Who this process is in a tensor-parallel group, read from the environment (no torch import, so the
CLI can route a torchrun follower before loading anything).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the followers that
``LLM(..., tensor_parallel_size=N)`` spawns get the same variables plus ``TANDEM_TP_SPAWNED=1`` (their
rank 0 hosts the rendezvous store itself)."""
from __future__ import annotations

import os
from dataclasses import dataclass

#: NVLink SHARP (multicast) stays off on every rank: the multi-GPU machines here require it.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SPAWNED = "TANDEM_TP_SPAWNED"
PARENT_PID = "TANDEM_TP_PARENT_PID"  # rank 0's process, for spawned followers


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    spawned: bool  # started by a rank 0 that hosts the store (else: torchrun's rendezvous)


def rank_env() -> RankEnv | None:
    """This process's place in a launched group, or None outside one (a plain single process)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])),
                   env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")),
                   env.get(SPAWNED) == "1")


def is_follower_process() -> bool:
    """A rank other than 0 of a launched group: it runs the follower loop, not the command."""
    env = rank_env()
    return env is not None and env.world_size > 1 and env.rank != 0


def check_world_matches(tensor_parallel_size: int | None) -> None:
    """Under torchrun, the command's tensor_parallel_size must be the world size: the followers wait for
    rank 0's engine, so a rank 0 that would run without them must fail (torchrun then stops them)."""
    env = rank_env()
    if env is not None and env.world_size > 1 and tensor_parallel_size != env.world_size:
        raise ValueError(f"torchrun started {env.world_size} ranks, so pass --tensor-parallel-size "
                         f"{env.world_size} (got {tensor_parallel_size})")


def disable_multicast() -> None:
    """In this process, before NCCL initialises (it reads its environment once)."""
    os.environ.update(MULTICAST_OFF)
