"""The API process's end of the link to the engine-core process: spawn it, wait until it is ready,
send it messages, and make sure it never outlives us.

The API process binds both ipc sockets in a private temp dir and the core connects, so the core's
sends queue on its own side (unbounded) and never block its loop. The core is started with the
"spawn" context: a forked child would inherit this process's threads and any CUDA state."""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import zmq
import zmq.asyncio

from tandem.config import EngineConfig
from tandem.server.core_process import core_main
from tandem.server.liveness import CoreStamps
from tandem.server.messages import (Failed, InputMessage, Ready, Shutdown, input_encoder, output_decoder)

log = logging.getLogger(__name__)


class CoreStartupError(ValueError):
    """The engine core could not start; the message is the core's own (a ValueError for the CLI)."""


class CoreDeadError(RuntimeError):
    """The engine core process is gone; no request can complete any more."""


_DIR_PREFIX = "tandem-core-"


def _remove_stale_dirs() -> None:
    """Socket dirs of API processes that were killed (SIGKILL leaves no chance to clean up)."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(_DIR_PREFIX + "*-*"):
        pid = path.name[len(_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, someone else's


def bind_link(ctx: zmq.Context, input_addr: str, output_addr: str) -> tuple[zmq.Socket, zmq.Socket]:
    """An API process's two sockets to one core, bound here: PUSH for requests, PULL for its messages."""
    requests = ctx.socket(zmq.PUSH)
    requests.setsockopt(zmq.SNDHWM, 0)  # sends never block the event loop
    requests.setsockopt(zmq.LINGER, 0)
    requests.bind(input_addr)
    messages = ctx.socket(zmq.PULL)
    messages.setsockopt(zmq.RCVHWM, 0)
    messages.setsockopt(zmq.LINGER, 0)
    messages.bind(output_addr)
    return requests, messages


class CoreChannel:
    def __init__(self, config: EngineConfig, log_level: int = logging.WARNING,
                 env: dict[str, str] | None = None, peers: int = 0) -> None:
        """``env``: set in the core's environment before it builds anything (its GPUs). ``peers``:
        further API processes (``--api-server-count``) that will bind ``peer_addresses`` and attach."""
        _remove_stale_dirs()
        self.tmpdir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self.ctx = zmq.Context()
        self.encoder = input_encoder()
        self.decoder = output_decoder()
        input_addr, output_addr = f"ipc://{self.tmpdir}/input", f"ipc://{self.tmpdir}/output"
        self.input, self.output = bind_link(self.ctx, input_addr, output_addr)
        self.peer_addresses = [(f"{input_addr}-{a}", f"{output_addr}-{a}") for a in range(1, peers + 1)]
        spawn = multiprocessing.get_context("spawn")
        self.stamps = CoreStamps(spawn)  # the core's heartbeat and progress, for the watchdog
        inputs = [input_addr] + [a for a, _ in self.peer_addresses]
        outputs = [output_addr] + [b for _, b in self.peer_addresses]
        self.process = spawn.Process(target=core_main, name="tandem-core", daemon=True,
                                     args=(config, inputs, outputs, os.getpid(), log_level, self.stamps, env or {}))
        self.process.start()
        self.closed = False

    def wait_ready(self, timeout_s: float | None = None) -> Ready:
        """Block until the core has built its worker; raise CoreStartupError if it cannot."""
        waited_ms = 0
        while timeout_s is None or waited_ms < timeout_s * 1000:
            if self.output.poll(200):
                msg = self.decoder.decode(self.output.recv())
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, Failed):
                    self.close()
                    raise CoreStartupError(msg.message)
            elif not self.process.is_alive():
                code = self.process.exitcode
                self.close()
                raise CoreStartupError(f"the engine core process exited during start-up (exit code {code})")
            waited_ms += 200
        self.close()
        raise CoreStartupError(f"the engine core did not start within {timeout_s} s")

    def async_output(self) -> zmq.asyncio.Socket:
        """The output socket for the event loop (same underlying socket)."""
        return zmq.asyncio.Socket.from_socket(self.output)

    def send(self, msg: InputMessage) -> None:
        self.send_encoded(self.encoder.encode(msg))

    def send_encoded(self, frame: bytes) -> None:
        """Send a message already encoded (a caller that must know it encodes before acting on it)."""
        if self.closed:
            raise CoreDeadError("the engine core has been shut down")
        try:
            self.input.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # no peer any more: the core is gone
            raise CoreDeadError(f"cannot reach the engine core ({exc})") from exc

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the core process ends."""
        return self.process.sentinel

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the core to stop (it aborts what runs), then make sure it is gone. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.process.is_alive():
            try:
                self.input.send(self.encoder.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            log.warning("the engine core did not stop in %.0f s: terminating it", timeout_s)
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
