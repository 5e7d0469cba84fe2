"""The draft model's KV blocks: its own cache, its own block lists (not the target's block tables:
the two caches differ in shape, and the target's blocks are shared and freed by rules the draft need
not follow). Block 0 is never handed out: padding rows and columns point at it."""
from __future__ import annotations


class DraftBlocks:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, 0, -1))

    def reserve(self, held: list[int], num_tokens: int) -> bool:
        """Grow ``held`` to cover ``num_tokens`` positions; False (nothing taken) if too few are free."""
        need = -(-num_tokens // self.block_size) - len(held)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            held.append(self.free.pop())
        return True

    def release(self, held: list[int]) -> None:
        self.free += held
