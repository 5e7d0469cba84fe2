"""Paged KV blocks (a free list, reference counts, per-sequence block lists, the prefix cache's
evictable blocks) and the rows of the device's next-token table. Which step may reuse what is the
scheduler's business."""
from __future__ import annotations

from collections import deque

from tandem.engine.prefix_cache import PrefixCache


class BlockManager:
    """Block 0 is reserved as the padding target and is never handed out.

    Blocks are reference counted: with prefix caching a full block may be in several sequences'
    block lists. A block nobody references goes back to the free list, or, if it holds a cached
    prefix, to the cache's evictable blocks: still findable, and reused (forgetting its prefix) only
    when the free list is empty, least recently freed first. Both count as free."""

    def __init__(self, num_blocks: int, block_size: int, cache: PrefixCache | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.cache = cache
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free) + (self.cache.num_evictable if self.cache else 0)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def blocks_needed(self, num_held: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_grow(self, block_ids: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(len(block_ids), num_tokens) <= self.num_free

    def can_share_and_grow(self, shared: list[int], num_tokens: int) -> bool:
        """Whether a sequence may take the cached blocks ``shared`` and grow to ``num_tokens``: the
        shared blocks that are evictable stop counting as free once taken."""
        taken = sum(1 for b in shared if self._refs[b] == 0)
        return self.blocks_needed(len(shared), num_tokens) <= self.num_free - taken

    def share(self, block_ids: list[int], shared: list[int]) -> None:
        """Append the cached blocks ``shared`` to ``block_ids``, one more reference each."""
        for b in shared:
            if self._refs[b] == 0:
                self.cache.take(b)
            self._refs[b] += 1
        block_ids.extend(shared)

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Extend ``block_ids`` in place so it covers ``num_tokens`` tokens."""
        if num_tokens <= len(block_ids) * self.block_size:
            return
        need = self.blocks_needed(len(block_ids), num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free} free")
        block_ids.extend(self._allocate_many(need))

    def allocate(self, count: int) -> list[int]:
        """``count`` blocks at once (one reference each): the decode path's new blocks of a step."""
        if count > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {count}, {self.num_free} free")
        return self._allocate_many(count)

    def _allocate_many(self, count: int) -> list[int]:
        free = self._free
        if len(free) < count:  # some come from evicting cached prefixes, one at a time
            return [self._allocate() for _ in range(count)]
        blocks = [free.popleft() for _ in range(count)]
        refs = self._refs
        for b in blocks:
            refs[b] = 1
        return blocks

    def _allocate(self) -> int:
        block = self._free.popleft() if self._free else self.cache.evict()
        self._refs[block] = 1
        return block

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. Last block first: a chain's tail is then evicted before
        its head, which other prompts are likelier to share."""
        for b in reversed(block_ids):
            self._refs[b] -= 1
            if self._refs[b] == 0 and not (self.cache and self.cache.release(b)):
                self._free.append(b)

    def reset_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their K/V but can no longer be found)."""
        if self.cache:
            self._free.extend(self.cache.clear())


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
