"""Further API processes (``--api-server-count M``): M - 1 more processes serving the same app on the
same listening socket (the kernel hands each connection to one of them), each talking to every
engine core.

The first API process (the one ``tandem serve`` runs) starts the cores, telling each about the
others' ipc addresses, then spawns the followers and waits until each is ready before it announces
the port. A core sends every message to every API process; each skips the requests it does not
know (``OutputProcessor`` ignores unknown ids) and every one reads the stats. Engine request ids are
random UUIDs, so the processes never collide in a core.

Life cycle: a follower dies with the first process (``PR_SET_PDEATHSIG``); SIGINT / SIGTERM to the
first process is forwarded to the followers, and the cores are stopped only once they are gone; a
follower that dies, or a core that dies, takes the server down with exit status 1 (a core's death
is seen at once by every API process, through its pidfd). ``/metrics`` answers the same in every
process: figures only an API process knows (its requests' tokens, latencies, outcomes) are shared
through small files in a private folder (``metrics.SharedFigures``)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tandem.server.core_process import die_with_parent
from tandem.server.dp_attach import CoreAddress, core_addresses
from tandem.server.metrics import ServerMetrics, SharedFigures

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0


@dataclass
class FollowerPlan:
    """What a further API process is handed at spawn."""

    index: int  # 1 .. M - 1 (the first process is 0)
    cores: list[CoreAddress]
    metrics_dir: str


#: ``run(config, options, sock, plan, on_ready) -> exit status``: launch's serving of a follower
FollowerRun = Callable[[Any, Any, socket.socket, FollowerPlan, Callable[[], None]], int]


def follower_main(run: FollowerRun, config: Any, options: Any, sock: socket.socket, plan: FollowerPlan,
                  parent_pid: int, conn: Connection) -> None:
    """Entry point of a spawned API process: ``None`` through ``conn`` once ready, else the error."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=options.log_level, format=f"%(levelname)s %(name)s [api {plan.index}]: %(message)s")
    try:
        code = run(config, options, sock, plan, lambda: conn.send(None))
    except Exception as exc:  # noqa: BLE001 - the first process must hear why, and fail the start
        conn.send(str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
        code = 2
    sys.stdout.flush()
    os._exit(code)


class Followers:
    """The further API processes, as the first one sees them."""

    def __init__(self, run: FollowerRun, config: Any, options: Any, sock: socket.socket,
                 plans: list[FollowerPlan]) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []
        for plan in plans:
            ours, theirs = spawn.Pipe(duplex=False)
            proc = spawn.Process(target=follower_main, name=f"tandem-api-{plan.index}", daemon=True,
                                 args=(run, config, options, sock, plan, os.getpid(), theirs))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self.stopping = False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until each has its cores ready and its app built; ValueError naming the first that failed."""
        for index, (proc, conn) in enumerate(zip(self.procs, self.conns), 1):
            if not conn.poll(timeout_s):
                raise ValueError(f"API process {index} did not start within {timeout_s:.0f} s")
            try:
                problem = conn.recv()
            except EOFError:
                proc.join(1.0)
                raise ValueError(f"API process {index} exited during start-up (exit code {proc.exitcode})") from None
            if problem is not None:
                raise ValueError(f"API process {index}: {problem}")

    @property
    def sentinels(self) -> list[int]:
        return [proc.sentinel for proc in self.procs]

    def terminate(self) -> None:
        """Ask each to shut down (as a signal to the first process does); returns at once."""
        self.stopping = True
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut each down and wait for it; killed if it does not stop in time. Idempotent."""
        self.terminate()
        for proc in self.procs:
            proc.join(timeout_s)
            if proc.is_alive():
                log.warning("API process %s did not stop in %.0f s: killing it", proc.name, timeout_s)
                proc.kill()
                proc.join(2.0)


def start_followers(run: FollowerRun, config: Any, options: Any, sock: socket.socket, client: Any) -> None:
    """In the first API process, once its cores are ready: the further ones, started and waited for
    (nothing with ``--api-server-count 1``). A follower that cannot start stops them all."""
    count = options.api_server_count
    if count == 1:
        return
    folder = client.cores[0].channel.tmpdir  # private, and removed with the first core's channel
    client.metrics.share(SharedFigures(folder, 0, count))
    plans = [FollowerPlan(a, [core_addresses(core.channel)[a - 1] for core in client.cores], folder)
             for a in range(1, count)]
    followers = Followers(run, config, options, sock, plans)
    try:
        followers.wait_ready()
    except BaseException:
        followers.stop()
        raise
    client.followers = followers


def follower_metrics(metrics: ServerMetrics, options: Any, plan: FollowerPlan | None) -> ServerMetrics:
    """A follower's metrics pool with the others'; the first process's start pooling in ``start_followers``."""
    if plan is not None:
        metrics.share(SharedFigures(plan.metrics_dir, plan.index, options.api_server_count))
    return metrics
