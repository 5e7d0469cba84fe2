"""Keeping Python's cyclic garbage collector out of the step loop.

A collection walks every tracked object that is not frozen, and every running request holds long
lists of token ids (its prompt and output here; the output processor's copy beside them). With 1024
sequences of 3K tokens one young-generation collection walked some three million list entries, a
12 ms pause of the host, which becomes a GPU gap once it outlasts a step; a full collection walks
everything alive.

The step loop makes no reference cycles (a whole run leaves no cyclic garbage: ``tests/test_heap.py``
checks it), so the collector has nothing to free among a request's objects: their reference counts
free them when the request ends. So the objects alive when a request arrives, and after a step that
let sequences join the running batch, are moved out of the collector's view (``gc.freeze()``, a
microsecond or two), and collections see only what the loop made since: each step's short-lived
objects.

Freezing is not free of risk: anything frozen that later becomes part of unreachable cycles (an
exception's traceback kept somewhere, a caller's own objects) is not collected while frozen. So once
the engine is idle and the heap has grown much since the last clean-up, everything is unfrozen,
collected and frozen again; idle, the pause costs no GPU time. The growth is read from the allocator
(``sys.getallocatedblocks()``, well under a millisecond: it visits memory pools, not objects), not
from ``gc.get_freeze_count()``, which walks every frozen object (18 ms with torch imported, 56 ms
beside three million lists) and so put a heap-sized pause at the end of every run. At exit
everything is unfrozen, so the interpreter's last collection still frees what was frozen (extension
types that count their live objects at shutdown, Triton's among them, would otherwise report them as
leaked)."""
from __future__ import annotations

import atexit
import contextlib
import gc
import sys
from collections.abc import Iterator

#: growth of the allocator's blocks since the last clean-up (objects and their buffers, about three
#: per list) that makes an idle engine clean up: some tens of MB of Python objects
CLEANUP_AFTER_BLOCKS = 1_000_000

_unfreeze_at_exit = False


def freeze() -> None:
    """``gc.freeze()``, undone when the interpreter exits."""
    global _unfreeze_at_exit
    if not _unfreeze_at_exit:
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
    gc.freeze()


class HeapFreezer:
    def __init__(self, cleanup_after_blocks: int = CLEANUP_AFTER_BLOCKS) -> None:
        self.cleanup_after_blocks = cleanup_after_blocks
        self._baseline: int | None = None  # set at the first admission: start-up's own growth comes before
        self._held = False
        self.cleanups = 0

    def admitted(self) -> None:
        """A request arrived, or joined the running batch (long-lived objects, with their token and
        block lists): out of the collector's view now, so a burst of arrivals does not pile up in
        the young generation either."""
        if self._baseline is None:
            self._baseline = sys.getallocatedblocks()
        freeze()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No clean-up while a benchmark's clock runs: its run's last step leaves the engine idle, and a
        full collection there (0.1-0.5 s with a model loaded) would count as the run's time; the
        caller calls ``idle`` once the clock has stopped."""
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def idle(self) -> None:
        """No request is left: if the heap grew much since the last clean-up, collect what was frozen."""
        if self._held or self._baseline is None or \
                sys.getallocatedblocks() - self._baseline <= self.cleanup_after_blocks:
            return
        gc.unfreeze()
        gc.collect()
        freeze()
        self._baseline = sys.getallocatedblocks()
        self.cleanups += 1
