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
the engine is idle and much has been frozen since the last clean-up, everything is unfrozen,
collected and frozen again; idle, the pause costs no GPU time. At exit everything is unfrozen, so
the interpreter's last collection still frees what was frozen (extension types that count their live
objects at shutdown, Triton's among them, would otherwise report them as leaked)."""
from __future__ import annotations

import atexit
import gc

#: frozen objects added since the last clean-up that make an idle engine clean up
CLEANUP_AFTER = 200_000
#: admissions between two counts of the frozen objects: ``gc.get_freeze_count()`` walks the whole
#: permanent generation (17-25 ms with a model loaded), too long to pay every time the engine goes idle
ADMISSIONS_PER_COUNT = 256

_unfreeze_at_exit = False


def freeze() -> None:
    """``gc.freeze()``, undone when the interpreter exits."""
    global _unfreeze_at_exit
    if not _unfreeze_at_exit:
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
    gc.freeze()


class HeapFreezer:
    def __init__(self, cleanup_after: int = CLEANUP_AFTER, admissions_per_count: int = ADMISSIONS_PER_COUNT) -> None:
        self.cleanup_after = cleanup_after
        self.admissions_per_count = admissions_per_count
        self._baseline: int | None = None  # set at the first admission: start-up's own freeze comes before
        self._admissions = 0  # since the frozen objects were last counted
        self.cleanups = 0

    def admitted(self) -> None:
        """A request arrived, or joined the running batch (long-lived objects, with their token and
        block lists): out of the collector's view now, so a burst of arrivals does not pile up in
        the young generation either."""
        if self._baseline is None:
            self._baseline = gc.get_freeze_count()
        self._admissions += 1
        freeze()

    def idle(self) -> None:
        """No request is left: collect what was frozen since the last clean-up, if it is much (counted
        only every ``admissions_per_count`` admissions)."""
        if self._baseline is None or self._admissions < self.admissions_per_count:
            return
        self._admissions = 0
        if gc.get_freeze_count() - self._baseline > self.cleanup_after:
            gc.unfreeze()
            gc.collect()
            freeze()
            self._baseline = gc.get_freeze_count()
            self.cleanups += 1
