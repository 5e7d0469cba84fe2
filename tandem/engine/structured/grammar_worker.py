"""A grammar worker process: ``python -m tandem.engine.structured.grammar_worker SOCKET_FD MASK_FD``.

It holds the rules (``TokenRules``, with their xgrammar matchers) of the requests the engine
assigned to it, and for each step message advances them by their new tokens and writes their rows
of the next mask into the shared mask (``shared_mask``), with the very code the engine runs
without workers (``stepping``). xgrammar holds the GIL in its calls, so processes, not threads,
are what run this work beside the engine's loop and beside each other.

It exits when the engine's end of the socket closes (the engine stopped, or died); an exception
is reported in the step's answer, then it exits."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from multiprocessing.connection import Connection

import msgspec

from tandem.engine.structured import stepping
from tandem.engine.structured.messages import Done, Ready, Setup, Step
from tandem.engine.structured.rules import TokenRules
from tandem.engine.structured.shared_mask import SharedMask


class _Worker:
    def __init__(self, setup: Setup, mask_fd: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.deserialize_json(setup.tokenizer_info)
        self.mask = SharedMask(setup.rows, setup.words, mask_fd)
        self.stop_ids = setup.stop_ids
        self.stop_set = frozenset(setup.stop_ids)
        self.grammars: dict[int, object] = {}
        self.rules: dict[int, TokenRules] = {}
        self.batch_fill = xgr.BatchGrammarMatcher(1)

    def step(self, msg: Step) -> Done:
        from tandem.engine.structured.matcher import RequestGrammar

        for gid in msg.forget:
            self.grammars.pop(gid, None)
        for gid, text in msg.grammars:
            self.grammars[gid] = self.xgr.CompiledGrammar.deserialize_json(text, self.info)
        for add in msg.adds:
            grammar = None if add.grammar < 0 else RequestGrammar(self.grammars[add.grammar], self.stop_ids)
            self.rules[add.handle] = TokenRules.from_spec(add.rules, grammar)
        for handle in msg.drops:
            self.rules.pop(handle, None)
        batch, at = [], 0
        for handle, count in zip(msg.adv_handles, msg.adv_counts):
            batch.append((self.rules[handle], msg.adv_tokens[at:at + count]))
            at += count
        advanced = [(i, *o) for i, o in enumerate(stepping.advance(batch, self.stop_set)) if o[0] != stepping.ACCEPTED]
        ended = {msg.adv_handles[i] for i, *_ in advanced}
        for handle in ended:  # its row (if any) allows everything; the engine ends the request
            del self.rules[handle]
        rows = [(row, self.rules.get(h), gen, tuple(ahead))
                for h, row, gen, ahead in zip(msg.fill_handles, msg.fill_rows, msg.fill_gen, msg.fill_ahead)]
        filled = stepping.fill(rows, self.mask.slots[msg.slot], self.batch_fill) if rows else []
        return Done(advanced, filled)


def serve(conn: Connection, mask_fd: int) -> None:
    setup = msgspec.msgpack.decode(conn.recv_bytes(), type=Setup)
    worker = _Worker(setup, mask_fd)
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(Step).decode
    try:
        conn.send_bytes(encode(Ready(os.getpid())))
    except OSError:  # the engine stopped while this process started
        return
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            began = time.perf_counter()
            done = worker.step(decode(data))
            done.seconds = time.perf_counter() - began
        except Exception:  # noqa: BLE001 - reported to the engine, which fails this worker's requests
            conn.send_bytes(encode(Done([], [], traceback.format_exc(limit=8))))
            return
        conn.send_bytes(encode(done))


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the engine stops us
    sock = socket.socket(fileno=int(argv[0]))
    conn = Connection(sock.detach())
    serve(conn, int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
