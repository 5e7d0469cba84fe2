"""Automatic prefix caching: which KV blocks hold the K/V of which token prefix.

A full block is named by a hash chain: ``block_hash(parent's hash, the block's token ids)``, so one
hash stands for every token from position 0 to the block's end. Two sequences whose tokens agree up
to a block's end have the same K/V there (a position's K/V depends only on the tokens up to it), so
the second may read the first's block instead of computing it.

The hash is BLAKE2b with a 16-byte digest, over the parent's digest and the token ids as
little-endian int64. Why not Python's ``hash()`` of a tuple: it is 64 bits and not designed to
resist crafted inputs, and a collision would hand one request another's K/V (wrong tokens, and a
leak across users of a server). A 128-bit cryptographic digest makes a collision negligible (about
n^2 / 2^129 for n blocks ever registered) even for adversarial prompts, is the same in every process
and run, and costs well under 1 us per block of 16 tokens (0.06 ms for a 1280-token prompt on a
2-core CPU), paid once per full block.

This module keeps the map hash -> block and the blocks nobody references that still hold a prefix
(evictable, least recently freed first). Reference counts and the free list are the block manager's.
When a block may be registered and shared while steps are in flight is the scheduler's business
(see ``Scheduler._register_blocks`` and docs/pipeline.md)."""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tandem.engine.sequence import Sequence

if TYPE_CHECKING:
    from tandem.engine.kv_events import KVEventRecorder

BlockHash = bytes


def block_hash(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """The hash of a full block whose tokens follow the block hashed as ``parent`` (None: the first)."""
    return _chain(parent, _pack(token_ids))


def _pack(token_ids: list[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def _chain(parent: BlockHash | None, packed_tokens: bytes) -> BlockHash:
    return hashlib.blake2b((parent or b"") + packed_tokens, digest_size=16).digest()


def extend_block_hashes(seq: Sequence, block_size: int, num_blocks: int) -> list[BlockHash]:
    """Hashes of ``seq``'s first ``num_blocks`` blocks (fewer if its known tokens fill fewer). Each is
    computed once: ``seq.block_hashes`` keeps them (its tokens never change, even across preemption)."""
    hashes = seq.block_hashes
    first, last = len(hashes), min(num_blocks, (seq.prompt_len + len(seq.output_token_ids)) // block_size)
    if last > first:  # pack the new blocks' tokens at once: a long prompt is hashed in one pass
        packed = _pack(seq.known_tokens(first * block_size, last * block_size))
        width = 8 * block_size
        for i in range(last - first):
            hashes.append(_chain(hashes[-1] if hashes else None, packed[i * width:(i + 1) * width]))
    return hashes[:num_blocks]


@dataclass
class PrefixCacheStats:
    """Cumulative, in tokens: looked up at admission, and found cached (hit rate = hits / queries)."""

    queries: int = 0
    hits: int = 0


class PrefixCache:
    def __init__(self, events: KVEventRecorder | None = None) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, still cached; oldest first
        self.stats = PrefixCacheStats()
        self.events = events  # KV-cache events for routers (engine/kv_events.py); None: off

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks of the longest chain of ``hashes`` that is cached (a chain breaks at its first miss)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, block: int, h: BlockHash) -> None:
        """``block`` holds (or a launched step is writing) the K/V named by ``h``. If another block
        already has that content, the first stays the one found: this one stays private."""
        self.register_many([block], [h])

    def register_many(self, blocks: list[int], hashes: list[BlockHash]) -> None:
        """``register`` for each pair (one call for the blocks an admitted prompt fills)."""
        block_of, hash_of = self._block_of, self._hash_of
        for block, h in zip(blocks, hashes):
            if h not in block_of and block not in hash_of:
                block_of[h] = block
                hash_of[block] = h

    def take(self, block: int) -> None:
        """A sequence now references ``block``: it is no longer evictable."""
        self._evictable.pop(block, None)

    def release(self, block: int) -> bool:
        """Nobody references ``block`` any more: keep it findable (True) if it holds a prefix."""
        if block in self._hash_of:
            self._evictable[block] = None
            return True
        return False

    def evict(self) -> int | None:
        """Forget the least recently freed cached block and return it for reuse (None if there is none)."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        h = self._hash_of.pop(block)
        del self._block_of[h]
        if self.events is not None:
            self.events.removed(h)
        return block

    def clear(self) -> list[int]:
        """Forget every prefix; returns the evictable blocks, which are plain free blocks from now on.
        Blocks still referenced simply stop being findable."""
        freed = list(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()
        if self.events is not None:
            self.events.cleared()
        return freed

    def publish_stored(self, seq: Sequence, hashes: list[BlockHash], first: int, last: int, block_size: int) -> None:
        """KV-cache events: ``seq``'s blocks [first, last) were just registered. Those this cache now
        finds (not another block's duplicate) are published, one BlockStored per unbroken run."""
        run = first
        for i in range(first, last + 1):
            if i < last and self._block_of.get(hashes[i]) == seq.block_ids[i]:
                continue
            if i > run:
                self.events.stored(hashes[run - 1] if run else None, hashes[run:i],
                                   seq.known_tokens(run * block_size, i * block_size))
            run = i + 1

    def close(self) -> None:
        """Stop publishing events (what is queued goes out first)."""
        if self.events is not None:
            self.events.close()
