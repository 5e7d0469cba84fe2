"""Grammar worker processes, the engine's side (``EngineConfig.structured_output_workers``).

Each request with a grammar is assigned to one worker (the ready one holding the fewest), which
holds its rules from then on (``RemoteRules`` is the engine's handle on them). Per step the engine
``send``s each worker one message (its requests' new tokens and its rows of the next mask), does
its own share of the work meanwhile, and ``collect``s the answers: the workers run in parallel with
each other and with the engine's loop, and write their rows straight into the shared mask.

Workers are fresh interpreters (``python -m``, like the tensor-parallel ranks: a user's script is
never re-imported) started in the background when the first grammar is needed; requests wait until
one is ready. A worker that dies (or stops answering for ``TIMEOUT_S``) is reported with all the
handles it held, so the engine fails exactly those requests, and is started again."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import msgspec

from tandem.engine.structured.messages import Add, Done, Ready, Setup, Step
from tandem.engine.structured.rules import RulesSpec
from tandem.engine.structured.shared_mask import SharedMask

log = logging.getLogger(__name__)

TIMEOUT_S = 60.0  # a step's answer later than this: the worker is stuck, it is killed
GRAMMARS_PER_WORKER = 64  # compiled grammars a worker keeps for requests yet to come
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
_encode = msgspec.msgpack.Encoder().encode
_decode_done = msgspec.msgpack.Decoder(Done).decode


@dataclass
class RemoteRules:
    """A request's rules, held by grammar worker ``worker``."""

    handle: int
    worker: int
    num_accepted: int = 0  # output tokens sent to the worker


@dataclass
class Lost:
    """What a failed step cost: workers that died and every handle they held."""

    handles: list[int]
    why: str


@dataclass
class _Proc:
    index: int
    popen: subprocess.Popen | None = None
    conn: Connection | None = None
    ready: bool = False
    starting: bool = False
    handles: set[int] = field(default_factory=set)
    grammars: OrderedDict[int, None] = field(default_factory=OrderedDict)  # ids sent, least recent first
    new_grammars: list[tuple[int, str]] = field(default_factory=list)
    forget: list[int] = field(default_factory=list)
    adds: list[Add] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)


class GrammarWorkers:
    def __init__(self, count: int, tokenizer_info: Callable[[], Any], words: int, rows: int, stop_ids: list[int],
                 pin: Callable | None = None) -> None:
        """``tokenizer_info``: returns xgrammar's ``TokenizerInfo`` (called once, on a background thread);
        ``pin``: the device's ``Worker.pin_host_memory``, if it has one."""
        self.mask = SharedMask(rows, words)
        if pin is not None:
            self.mask.pin(pin)
        self.procs = [_Proc(i, starting=True) for i in range(count)]  # (all of them: being started)
        self.failure: str | None = None  # the workers could not start: requests with grammars fail with it
        self._first = set(range(count))  # workers of the first start not ready (nor failed) yet
        self._setup: bytes | None = None
        self._words, self._rows, self._stop_ids = words, rows, stop_ids
        self._next_handle = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._start_all, args=(tokenizer_info,), name="tandem-grammar-workers",
                         daemon=True).start()

    # --- starting ------------------------------------------------------------------------------------
    def _start_all(self, tokenizer_info: Callable[[], Any]) -> None:
        try:
            info = tokenizer_info().serialize_json()
            self._setup = _encode(Setup(info, self._words, self._rows, self._stop_ids))
            for proc in self.procs:  # all start (import xgrammar) at once
                self._launch(proc)
            for proc in self.procs:
                self._send_setup(proc)
        except Exception as exc:  # noqa: BLE001 - said to every request that needs a worker
            self.failure = f"{type(exc).__name__}: {exc}"
            self._first.clear()
            for proc in self.procs:
                proc.starting = proc.starting and proc.conn is not None
            log.error("grammar workers could not start: %s", self.failure)

    def _launch(self, proc: _Proc) -> None:
        path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        with self._lock:  # never a process started after shutdown
            if self._closed:
                return
            proc.starting, proc.ready = True, False
            ours, theirs = socket.socketpair()
            cmd = [sys.executable, "-m", "tandem.engine.structured.grammar_worker", str(theirs.fileno()),
                   str(self.mask.fd)]
            proc.popen = subprocess.Popen(cmd, pass_fds=(theirs.fileno(), self.mask.fd), stdin=subprocess.DEVNULL,
                                          env={**os.environ, "PYTHONPATH": path})
            theirs.close()
            proc.conn = Connection(ours.detach())

    def _send_setup(self, proc: _Proc) -> None:
        try:
            if proc.conn is not None:
                proc.conn.send_bytes(self._setup)  # waits while the worker starts: this thread only
        except OSError:
            pass  # it died, or shutdown closed it: poll or collect find out
        finally:
            proc.starting = False

    def _restart(self, proc: _Proc) -> None:
        proc.starting = True  # (from now: ``poll`` must not take it for gone)
        threading.Thread(target=self._spawn_logged, args=(proc,), name="tandem-grammar-worker", daemon=True).start()

    def _spawn_logged(self, proc: _Proc) -> None:
        try:
            self._launch(proc)
            self._send_setup(proc)
        except Exception as exc:  # noqa: BLE001 - this slot stays empty; the others serve
            proc.starting = False
            log.error("grammar worker %d could not be started again: %s", proc.index, exc)

    def poll(self) -> bool:
        """Whether requests can be given to workers (reads the ready messages that came): once every
        worker of the first start is ready (or failed), so that the first requests spread over all of
        them; later, while any is ready (one being started again takes requests once it is)."""
        for proc in self.procs:
            if not proc.ready and not proc.starting and proc.conn is not None and proc.conn.poll(0):
                try:
                    msgspec.msgpack.decode(proc.conn.recv_bytes(), type=Ready)
                    proc.ready = True
                except (EOFError, OSError, msgspec.DecodeError):
                    status = self._reap(proc)
                    if not any(p.ready or p.starting or p.conn is not None for p in self.procs):
                        self.failure = f"grammar worker {proc.index} exited while starting (status {status})"
                self._first.discard(proc.index)
        if self.failure is None and not any(p.ready or p.starting or p.conn is not None for p in self.procs):
            self.failure = "every grammar worker exited, and none could be started again"
        return not self._first and any(p.ready for p in self.procs)

    def wait_ready(self, timeout: float) -> bool:
        conns = [p.conn for p in self.procs if not p.ready and not p.starting and p.conn is not None]
        if conns:
            wait(conns, timeout)
        else:  # still being started: nothing to wait on yet
            time.sleep(timeout)
        return self.poll()

    @property
    def pids(self) -> list[int | None]:
        return [p.popen.pid if p.popen is not None and p.ready else None for p in self.procs]

    # --- requests ------------------------------------------------------------------------------------
    def assign(self, grammar_id: int, serialized: Callable[[], str], rules: RulesSpec) -> RemoteRules:
        """A request's rules, to the ready worker holding the fewest (``serialized``: the grammar's
        text, asked for only if that worker does not have it)."""
        proc = min((p for p in self.procs if p.ready), key=lambda p: len(p.handles))
        if grammar_id in proc.grammars:
            proc.grammars.move_to_end(grammar_id)
        else:
            proc.new_grammars.append((grammar_id, serialized()))
            proc.grammars[grammar_id] = None
            if len(proc.grammars) > GRAMMARS_PER_WORKER:
                proc.forget.append(proc.grammars.popitem(last=False)[0])
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        proc.adds.append(Add(handle, grammar_id, rules))
        proc.handles.add(handle)
        return RemoteRules(handle, proc.index)

    def drop(self, rules: RemoteRules) -> None:
        proc = self.procs[rules.worker]
        if rules.handle in proc.handles:
            proc.handles.discard(rules.handle)
            proc.drops.append(rules.handle)

    # --- a step --------------------------------------------------------------------------------------
    def send(self, advances: list[tuple[RemoteRules, list[int]]],
             fills: list[tuple[RemoteRules, int, int, tuple[int, ...]]], slot: int) -> list[tuple[_Proc, Step]]:
        """Each worker with work in this step gets its message; returns what was sent, for ``collect``."""
        steps: dict[int, Step] = {}
        for rules, tokens in advances:
            msg = steps.get(rules.worker) or self._step(steps, rules.worker, slot)
            msg.adv_handles.append(rules.handle)
            msg.adv_counts.append(len(tokens))
            msg.adv_tokens += tokens
            rules.num_accepted += len(tokens)
        for rules, row, gen_index, ahead in fills:
            msg = steps.get(rules.worker) or self._step(steps, rules.worker, slot)
            msg.fill_handles.append(rules.handle)
            msg.fill_rows.append(row)
            msg.fill_gen.append(gen_index)
            msg.fill_ahead.append(list(ahead))
        sent = []
        for worker, msg in steps.items():
            proc = self.procs[worker]
            try:
                proc.conn.send_bytes(_encode(msg))
            except OSError:
                pass  # it died: collect finds its socket closed
            sent.append((proc, msg))
        return sent

    def _step(self, steps: dict[int, Step], worker: int, slot: int) -> Step:
        """Worker ``worker``'s message of this step, with what was queued for it since its last one."""
        p = self.procs[worker]
        msg = steps[worker] = Step(p.new_grammars, p.forget, p.adds, p.drops, [], [], [], [], [], [], [], slot)
        p.new_grammars, p.forget, p.adds, p.drops = [], [], [], []
        return msg

    def collect(self, sent: list[tuple[_Proc, Step]]) -> tuple[list[tuple[Step, Done]], Lost | None]:
        """The answers of the workers ``send`` wrote to; the dead ones' handles are lost."""
        waiting = {id(proc.conn): (proc, msg) for proc, msg in sent}
        answers, dead = [], []
        while waiting:
            ready = wait([proc.conn for proc, _ in waiting.values()], TIMEOUT_S)
            if not ready:  # stuck: given up on
                dead += [(proc, "did not answer in %.0f s" % TIMEOUT_S) for proc, _ in waiting.values()]
                break
            for conn in ready:
                proc, msg = waiting.pop(id(conn))
                try:
                    done = _decode_done(conn.recv_bytes())
                except (EOFError, OSError, msgspec.DecodeError):
                    proc.popen.wait(5) if proc.popen is not None else None
                    dead.append((proc, f"exited (status {proc.popen.returncode if proc.popen else None})"))
                    continue
                if done.error:
                    dead.append((proc, "failed: " + done.error.strip().splitlines()[-1]))
                    log.error("grammar worker %d failed:\n%s", proc.index, done.error)
                else:
                    answers.append((msg, done))
        return answers, self._lose(dead) if dead else None

    def _lose(self, dead: list[tuple[_Proc, str]]) -> Lost:
        handles: list[int] = []
        for proc, why in dead:
            log.error("grammar worker %d (pid %s) %s; its requests fail", proc.index,
                      proc.popen.pid if proc.popen else None, why)
            handles += sorted(proc.handles)
            self._reap(proc)
            self._restart(proc)
        return Lost(handles, f"the grammar worker process holding its grammar {dead[0][1]}")

    def _reap(self, proc: _Proc) -> int | None:
        proc.ready = False
        proc.handles.clear()
        proc.grammars.clear()
        proc.new_grammars, proc.forget, proc.adds, proc.drops = [], [], [], []
        if proc.conn is not None:
            proc.conn.close()
            proc.conn = None
        if proc.popen is not None:
            if proc.popen.poll() is None:
                proc.popen.kill()
            return proc.popen.wait()
        return None

    def shutdown(self) -> None:
        """Close every worker's socket (they exit on it) and wait for them; kill stragglers."""
        with self._lock:
            self._closed = True
            for proc in self.procs:
                if proc.conn is not None:
                    proc.conn.close()
                    proc.conn = None
        for proc in self.procs:
            if proc.popen is None:
                continue
            if not proc.ready:  # still starting (importing xgrammar): nothing of it to wait for
                proc.popen.kill()
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.mask.close()
