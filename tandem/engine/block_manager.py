"""Paged KV blocks (a free list and per-sequence block lists) and the rows of the device's
next-token table. Which step may reuse what is the scheduler's business."""
from __future__ import annotations

from collections import deque


class BlockManager:
    """Block 0 is reserved as the padding target and is never handed out."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_held: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_grow(self, block_ids: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(len(block_ids), num_tokens) <= self.num_free

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Extend ``block_ids`` in place so it covers ``num_tokens`` tokens."""
        if num_tokens <= len(block_ids) * self.block_size:
            return
        need = self.blocks_needed(len(block_ids), num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        block_ids.extend(self._free.popleft() for _ in range(need))

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class RowPool:
    """Rows of the device-side next-token table, one per sequence in the running batch."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self._free: deque[int] = deque(range(num_rows))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        return self._free.popleft() if self._free else None

    def release(self, row: int) -> None:
        self._free.append(row)
