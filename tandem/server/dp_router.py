"""Which engine core takes a request, under data parallelism: the policy alone (no sockets, no
processes), so it is unit-tested on its own.

Two signals:

- **Load**: the requests a core holds (waiting + running) and how full its KV cache is, as
  ``requests + KV_WEIGHT * kv_usage`` (a full cache counts as ``KV_WEIGHT`` more requests: new
  requests there wait for blocks, or preempt). The API process counts the requests it sent to each
  core itself (current to the request); the KV use is the core's last reported stat (<= 50 ms old).
- **Prefix**: a record of which chained prompt-block hashes (each full block of ``block_size``
  prompt tokens, hashed with everything before it) were last sent to which core, an LRU bounded to
  about what the cores' caches can hold. A request goes to the core that got its longest recorded
  prefix, unless that core's load exceeds the least loaded one's by more than ``margin``; then to
  the least loaded (ties: the lowest index).

The record is a guess: a core may have evicted the blocks since (the engine's prefix cache is an
LRU too), and the hashes are this process's own (Python's tuple hash, stable within a process), not
the engine's block hashes."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

KV_WEIGHT = 8.0  # a full KV cache counts as this many more requests
DEFAULT_MARGIN = 8.0  # a prefix holder may be this much more loaded than the least loaded core
MIN_RECORD_BLOCKS = 4096
_ROOT = 0x7A6E_6474  # the chain's seed


@dataclass
class CoreLoad:
    requests: int = 0  # waiting + running: sent by this process and not yet finished
    kv_usage: float = 0.0  # 0..1, from the core's last stats
    reported: int = 0  # waiting + running in the core's last stats: counted only where other API processes send too

    def score(self) -> float:
        return max(self.requests, self.reported) + KV_WEIGHT * self.kv_usage


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """One hash per full block of the prompt, each covering every token before it too."""
    hashes: list[int] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


@dataclass
class Choice:
    core: int
    matched_blocks: int  # of the prompt's prefix recorded on that core (0: chosen by load alone)


class PrefixRouter:
    def __init__(self, num_cores: int, block_size: int, max_blocks: int = MIN_RECORD_BLOCKS,
                 margin: float = DEFAULT_MARGIN, prefix_aware: bool = True) -> None:
        if num_cores < 1:
            raise ValueError("the router needs at least one engine core")
        self.loads = [CoreLoad() for _ in range(num_cores)]
        self.block_size = block_size
        self.max_blocks = max(max_blocks, 1)
        self.margin = margin
        self.prefix_aware = prefix_aware
        self.record: OrderedDict[int, int] = OrderedDict()  # block hash -> core, least recently used first

    def choose(self, token_ids: list[int]) -> Choice:
        """Pick a core for a prompt and record its blocks there (the caller sends it there)."""
        hashes = block_hashes(token_ids, self.block_size) if self.prefix_aware else []
        least = min(range(len(self.loads)), key=lambda c: (self.loads[c].score(), c))
        choice = Choice(least, 0)
        holder, matched = self._longest_prefix(hashes)
        if holder is not None and holder != least:
            if self.loads[holder].score() - self.loads[least].score() <= self.margin:
                choice = Choice(holder, matched)
        elif holder == least:
            choice = Choice(least, matched)
        self._remember(hashes, choice.core)
        return choice

    def _longest_prefix(self, hashes: list[int]) -> tuple[int | None, int]:
        """The core that got the deepest recorded block of this chain, and how many blocks deep."""
        holder: int | None = None
        matched = 0
        for depth, h in enumerate(hashes, 1):
            core = self.record.get(h)
            if core is None:
                break  # chained: nothing deeper can match
            holder, matched = core, depth
        return holder, matched

    def _remember(self, hashes: list[int], core: int) -> None:
        record = self.record
        for h in hashes:
            record[h] = core
            record.move_to_end(h)
        while len(record) > self.max_blocks:
            record.popitem(last=False)

    # --- load bookkeeping -----------------------------------------------------------------------
    def sent(self, core: int, count: int = 1) -> None:
        self.loads[core].requests += count

    def done(self, core: int, count: int = 1) -> None:
        self.loads[core].requests = max(0, self.loads[core].requests - count)

    def kv_usage(self, core: int, usage: float) -> None:
        self.loads[core].kv_usage = usage

    def reported(self, core: int, requests: int) -> None:
        """The core's own count (waiting + running), which includes other API processes' requests."""
        self.loads[core].reported = requests
