"""A further API process's link to an engine core it did not start (``--api-server-count`` > 1).

The first API process spawns every core (``CoreChannel``, with ``peers``) and owns it: it alone
stops it. Each further API process binds the two ipc addresses the core was told to connect to for
it (``CoreAddress``), and sees the core's process through a pidfd: readable the moment the core
exits, although it is not this process's child. Closing the link closes the sockets only."""
from __future__ import annotations

import os
import select
import signal
from dataclasses import dataclass

import zmq

from tandem.server.channel import CoreChannel, bind_link
from tandem.server.liveness import CoreStamps
from tandem.server.messages import input_encoder, output_decoder


@dataclass
class CoreAddress:
    """What a further API process needs to attach to one core (picklable: handed over at spawn)."""

    input_addr: str
    output_addr: str
    pid: int
    stamps: CoreStamps


def core_addresses(channel: CoreChannel) -> list[CoreAddress]:
    """The core's addresses for each further API process, in order."""
    return [CoreAddress(inp, out, channel.process.pid, channel.stamps) for inp, out in channel.peer_addresses]


class ForeignProcess:
    """The few things ``CoreLink`` and the watchdog ask of ``multiprocessing.Process``, for a process
    that is not our child (no exit code: only its parent can read that)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.sentinel = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already: a pidfd of our own that reads as ended
            read, write = os.pipe()
            os.close(write)
            self.sentinel = read
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return not select.select([self.sentinel], [], [], 0)[0]

    def join(self, timeout: float | None = None) -> None:
        select.select([self.sentinel], [], [], timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        os.close(self.sentinel)


class AttachedChannel(CoreChannel):
    """``CoreChannel``'s surface (wait_ready, send, async_output, sentinel) over a core this process
    did not start."""

    def __init__(self, address: CoreAddress) -> None:
        # CoreChannel.__init__ is not called: it would spawn a core
        self.tmpdir = None
        self.ctx = zmq.Context()
        self.encoder = input_encoder()
        self.decoder = output_decoder()
        self.input, self.output = bind_link(self.ctx, address.input_addr, address.output_addr)
        self.peer_addresses = []
        self.stamps = address.stamps
        self.process = ForeignProcess(address.pid)  # type: ignore[assignment]
        self.closed = False

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the link; the core serves on for the other API processes (the first one stops it)."""
        if self.closed:
            return
        self.closed = True
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.ctx.term()
        self.process.close()  # type: ignore[attr-defined]
