"""The grammar mask rows that worker processes fill: anonymous shared memory (a memfd), mapped by
the engine and by each grammar worker, two slots of [rows, words] int32.

Consecutive masked steps take alternate slots. A slot is written again two masked steps later, and
a masked step's rows are filled only once every step before it was collected (``EngineCore``), so
the device has long finished copying or reading the slot by then (hazard 2). On CUDA the engine
registers the mapping as page-locked memory (``pin``), so the executor's asynchronous copy reads the
rows where the workers wrote them (nothing is copied on the host; ``Worker.pin_host_memory``). The memory has no name: nothing
is left behind whatever way the processes end."""
from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable

import numpy as np


def _anonymous_fd(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tandem-grammar-mask")
    else:  # an unlinked file
        handle = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        fd = os.dup(handle.fileno())
        handle.close()
    os.ftruncate(fd, size)
    return fd


class SharedMask:
    """``SharedMask(rows, words)`` makes the memory; ``SharedMask(rows, words, fd)`` maps a worker's view."""

    def __init__(self, rows: int, words: int, fd: int | None = None) -> None:
        self.rows, self.words = rows, words
        self.size = 2 * rows * words * 4
        self.fd = _anonymous_fd(self.size) if fd is None else fd
        self._map = mmap.mmap(self.fd, self.size)
        self.slots = np.frombuffer(self._map, np.int32).reshape(2, rows, words)
        self._unpin: Callable[[], None] | None = None  # releases the page-locking

    def pin(self, pin_host_memory: Callable[[np.ndarray], Callable[[], None] | None]) -> bool:
        """Have the device page-lock the mapping (``Worker.pin_host_memory``); False: it stays pageable,
        and the executor copies the rows it is given."""
        self._unpin = pin_host_memory(self.slots)
        return self._unpin is not None

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self.slots = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
            pass
        os.close(self.fd)
        self.fd = -1
