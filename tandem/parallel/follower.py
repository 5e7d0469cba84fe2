"""Ranks 1..N-1: join the group, take rank 0's config and builder of start-up steps, build this
rank's worker (the same start-up steps as rank 0), then replay every step rank 0 announces, exactly
as rank 0 runs it (same executor, graphs, collectives), until told to stop. Tokens are sampled here
too (identically: the logits are all-gathered) and dropped.

``python -m tandem.parallel.follower`` with torchrun's variables set; the ``tandem`` CLI routes any
rank other than 0 here under torchrun."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque

import torch

from tandem.parallel.control import ControlReceiver, Kind
from tandem.parallel.env import PARENT_PID, rank_env
from tandem.parallel.group import join
from tandem.parallel.rank_worker import RankWorker, rank_config

logger = logging.getLogger("tandem.parallel.follower")


def serve_steps(worker: RankWorker, receiver: ControlReceiver) -> None:
    """Submit each step as it is announced and collect the one before, as rank 0's engine does (two
    steps in flight at most, the executors' double buffering)."""
    in_flight: deque = deque()
    while True:
        message = receiver.recv()
        if message.kind is Kind.STOP:
            break
        if message.kind is Kind.MASK:  # the newest step's, as rank 0 provided it
            worker.provide_mask(message.step_id, receiver.recv_mask(message))
            continue
        if message.kind is Kind.DRAIN:  # a step waiting for its mask samples here too (a logits gather)
            worker.drain()
            continue
        if message.kind is Kind.SET_ASYNC:
            while in_flight:
                worker.collect(in_flight.popleft())
            worker.set_async(bool(message.num_words))
            continue
        in_flight.append(worker.submit(message.step_inputs()))
        while len(in_flight) > 1:
            worker.collect(in_flight.popleft())
    while in_flight:
        worker.collect(in_flight.popleft())


def _exit_with_rank0(parent: int) -> None:
    """A follower spawned by rank 0's process dies with it: never left waiting in a collective,
    holding a GPU. (torchrun's agent does this for the ranks it starts.)"""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="tandem-tp-parent", daemon=True).start()


def main() -> int:
    env = rank_env()
    if env is None:
        print("tandem.parallel.follower: RANK and WORLD_SIZE are not set (start it with torchrun)", file=sys.stderr)
        return 2
    if env.spawned:
        _exit_with_rank0(int(os.environ[PARENT_PID]))
    logging.basicConfig(level=os.environ.get("TANDEM_TP_LOG_LEVEL", "WARNING"),
                        format=f"%(levelname)s rank{env.rank} %(name)s: %(message)s")
    group = join(env)
    config, startup = group.share_start(None, None)
    config = rank_config(config, env.local_rank)
    if config.device == "cpu":  # the ranks of one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.world_size)))
    worker = RankWorker(config, group, startup)
    try:
        serve_steps(worker, ControlReceiver(group.control))
    except RuntimeError as exc:  # rank 0 went away: its connections closed
        logger.error("tensor-parallel rank %d stops: %s", env.rank, exc)
        return 1
    worker.shutdown()
    worker.release_graphs()
    group.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
