"""Who this process is in a tensor-parallel group, read from the environment (no torch import, so the
CLI can route a torchrun follower before loading anything).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the followers that
``LLM(..., tensor_parallel_size=N)`` spawns get the same variables plus ``TANDEM_TP_SPAWNED=1`` (their
rank 0 hosts the rendezvous store itself, on loopback)."""
from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: NVLink SHARP (multicast) stays off on every rank: the multi-GPU machines here require it.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
LOOPBACK = "127.0.0.1"
#: the interface gloo and NCCL bind in a one-machine group (by default each binds the address this
#: machine's host name resolves to, often a public one)
LOOPBACK_SOCKETS = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
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


def meets_on_loopback(env: RankEnv) -> bool:
    """Every rank of the group is on this machine: spawned here, or started by torchrun with a loopback
    MASTER_ADDR (then only this machine can reach the rendezvous)."""
    if env.spawned or env.master_addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(env.master_addr).is_loopback
    except ValueError:  # a host name: another machine may be in the group
        return False


def confine_to_loopback() -> None:
    """A group on one machine listens on loopback only: in this process, before gloo or NCCL opens a
    socket (NCCL reads its environment once). A value the user exported (for multi-node runs, which
    torchrun starts with a reachable MASTER_ADDR and are left alone) is overridden here, and said so."""
    for name, value in LOOPBACK_SOCKETS.items():
        if os.environ.get(name, value) != value:
            logger.warning("%s=%s is overridden by %s for a tensor-parallel group on one machine (its ranks "
                           "talk over loopback only; across machines, launch with torchrun)",
                           name, os.environ[name], value)
        os.environ[name] = value
