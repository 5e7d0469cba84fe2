"""Single-node launch: rank 0 (the engine's process) hosts the rendezvous store and starts ranks
1..N-1 as fresh Python processes running ``tandem.parallel.follower``, with torchrun's variables.
Everything the group listens on is bound to loopback: the store (on a socket bound here to
127.0.0.1), and gloo's and NCCL's sockets (``confine_to_loopback``).

Fresh interpreters (not multiprocessing's spawn) so that a user's script is never re-imported by a
follower. A watcher thread reports a follower that dies; on CUDA it also ends the engine's process,
since NCCL collectives waiting for a dead rank would otherwise hang until the watchdog's timeout."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from tandem.parallel.env import LOOPBACK, MULTICAST_OFF, PARENT_PID, SPAWNED, RankEnv, confine_to_loopback
from tandem.parallel.group import TPGroup, collective_timeout, join, ready_key

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # holds the tandem package


def _follower_env(rank: int, size: int, port: int) -> dict[str, str]:
    path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **MULTICAST_OFF, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port), SPAWNED: "1",
            PARENT_PID: str(os.getpid()), "PYTHONPATH": path}  # the followers run this very tandem, whatever is installed


class Followers:
    """The spawned ranks' processes, watched until ``stop``."""

    def __init__(self, procs: list[subprocess.Popen], fatal: bool) -> None:
        self.procs, self.fatal = procs, fatal
        self._stopping = threading.Event()
        threading.Thread(target=self._watch, name="tandem-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            dead = [(rank, p.returncode) for rank, p in enumerate(self.procs, 1) if p.poll() is not None]
            if dead and not self._stopping.is_set():
                logger.error("tensor-parallel rank %d exited (status %s): the group cannot run without it",
                             *dead[0])
                if self.fatal:
                    os._exit(1)
                return

    def wait_ready(self, store: dist.Store, timeout_s: float) -> None:
        """Until every follower reached the store; a follower that died on the way is an error now,
        not a rendezvous timeout later."""
        deadline = time.monotonic() + timeout_s
        keys = [ready_key(rank) for rank in range(1, len(self.procs) + 1)]
        while not store.check(keys):
            failed = [(rank, p.returncode) for rank, p in enumerate(self.procs, 1) if p.poll() is not None]
            if failed or time.monotonic() > deadline:
                self.stop(0)
                why = f"exited with status {failed[0][1]}" if failed else f"did not start in {timeout_s:.0f} s"
                raise RuntimeError(f"tensor-parallel rank {failed[0][0] if failed else 1} {why}")
            time.sleep(0.05)

    def expect_exit(self) -> None:
        """From now on a follower's exit is the shutdown, not a failure."""
        self._stopping.set()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Wait for the followers to exit (after ``expect_exit`` and the shutdown message); kill stragglers."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def loopback_store(size: int) -> dist.TCPStore:
    """The group's rendezvous store, listening on 127.0.0.1 only. torch's TCPStore server binds the
    wildcard address (``::``) whatever host it is given (both backends, torch 2.13), so it is handed a
    socket bound here instead (the store owns and closes it)."""
    sock = socket.create_server((LOOPBACK, 0))
    return dist.TCPStore(LOOPBACK, sock.getsockname()[1], size, is_master=True, wait_for_workers=False,
                         timeout=collective_timeout(), master_listen_fd=sock.detach(), use_libuv=True)


def start_local_group(size: int, fatal_on_loss: bool) -> tuple[TPGroup, Followers]:
    """Rank 0 of ``size`` ranks on this machine: host the store, start the others, join."""
    confine_to_loopback()  # before the followers inherit the environment
    store = loopback_store(size)
    procs = [subprocess.Popen([sys.executable, "-m", "tandem.parallel.follower"],
                              env=_follower_env(rank, size, store.port)) for rank in range(1, size)]
    followers = Followers(procs, fatal_on_loss)
    try:
        followers.wait_ready(store, collective_timeout().total_seconds())
        group = join(RankEnv(0, size, 0, LOOPBACK, store.port, spawned=True), store)
    except BaseException:
        followers.stop(0)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return group, followers
