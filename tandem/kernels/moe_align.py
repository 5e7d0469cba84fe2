"""The fused MoE kernel's host-side plan, and the definition of its first device step: tiles from
shapes, and the (token, slot) pairs sorted by expert.

- ``moe_blocks`` picks the GEMM tiles on the host from shapes only (slots per expert, T*k/E).
- ``align_tokens`` groups the T*k (token, slot) pairs by expert, each group padded to a multiple
  of ``block_m`` with the sentinel T*k, so that one tile of rows of the grouped GEMM reads one
  expert's weights. A route whose id is the expert count E is held by no expert here (expert
  parallelism: another rank's): it joins no group, so no tile computes it. Its buffers have their
  worst-case size whatever the routing (``max_blocks``);
  the number of rows actually used stays on the device, and the kernel's programs past it exit.
  It is plain torch with static shapes and no host read; the kernel runs the same thing as one
  Triton launch (``fused_moe.align``), which the tests compare with it.
- ``workspace_bytes`` is what one call of the kernel allocates, for the memory plan.

Torch only (no Triton), so the memory plan can import it anywhere."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEBlocks:
    """Tiles of the grouped GEMM: ``block_m`` rows (token slots of one expert), ``block_n`` output
    columns, ``block_k`` of the reduction per iteration; ``group_m`` row tiles share a column band
    (L2 reuse of the weights)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Decode: a handful of slots per expert, so the rows are mostly padding and each step is a read of
# the touched experts' weights: small row tiles, deep reductions. Prefill: enough slots per expert
# for compute-bound tiles. Chosen by slots per expert (T*k/E), a shape, never routing.
DECODE_BLOCKS = MoEBlocks(16, 64, 128, 1, 4, 4)
MEDIUM_BLOCKS = MoEBlocks(32, 64, 64, 4, 4, 4)
PREFILL_BLOCKS = MoEBlocks(64, 128, 64, 8, 8, 3)


def moe_blocks(num_tokens: int, top_k: int, num_experts: int) -> MoEBlocks:
    """The tiles for T tokens routed to k of E experts (host only: shapes, no device reads)."""
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 16:
        return DECODE_BLOCKS
    return MEDIUM_BLOCKS if per_expert <= 64 else PREFILL_BLOCKS


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Row tiles the aligned slots can fill at worst: every expert's group padded (at most
    ``block_m - 1`` sentinels each), and never more tiles than slots (each tile holds at least one
    real slot). Dropped routes (id E) only lower the true count."""
    return min(num_slots, -(-(num_slots + num_experts * (block_m - 1)) // block_m))


@dataclass
class MoEAlignment:
    """``sorted_ids`` [max_blocks * block_m] int32: slot indices t * k + j grouped by expert, each
    group padded with the sentinel T*k; ``expert_ids`` [max_blocks] int32: the expert of each row
    tile; ``num_padded`` [1] int32 (on the device): rows in use. Past it the contents are
    unspecified (``align_tokens`` fills sentinels, the Triton kernel writes nothing): no one reads
    them, the GEMM's tiles there exit first. A dropped slot (routed to the id E) appears nowhere."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.expert_ids.numel()


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Group the (token, slot) pairs of ``topk_ids`` [T, k] by expert, stably (within an expert,
    in slot order), each group padded to a multiple of ``block_m``. Ids lie in [0, E]; a slot with
    id E (``num_experts``, the dropped-route sentinel) is placed nowhere."""
    flat = topk_ids.reshape(-1).long()
    n, device = flat.numel(), flat.device
    # scatter_add, not bincount: bincount sizes its output from the ids' maximum, a host sync on CUDA.
    # Bin E counts the dropped slots; only the first E bins make groups.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_experts] + (block_m - 1)) // block_m * block_m
    ends = padded.cumsum(0)  # padded group e occupies rows [ends[e] - padded[e], ends[e])
    order = torch.argsort(flat, stable=True)  # dropped slots sort last
    expert_of = flat[order]
    rank = torch.arange(n, device=device) - (counts.cumsum(0) - counts)[expert_of]  # index within its group
    blocks = max_blocks(n, num_experts, block_m)
    rows = blocks * block_m
    starts = torch.cat([ends - padded, ends.new_full((1,), rows)])  # dropped slots: the spare row `rows`
    dest = torch.where(expert_of < num_experts, starts[expert_of] + rank, rows)
    sorted_ids = torch.full((rows + 1,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    first_rows = torch.arange(blocks, device=device) * block_m
    # a tile's expert: the group whose padded range holds its first row (tiles past the end: any)
    expert_ids = torch.searchsorted(ends, first_rows, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return MoEAlignment(sorted_ids[:rows], expert_ids, ends[-1:].to(torch.int32), block_m)


ALLOCATOR_SLACK = 64 << 10


def workspace_bytes(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                    itemsize: int) -> int:
    """What one ``fused_experts`` call allocates beside its input and output: the activations
    [T*k, I], the per-slot outputs [T*k, H] (k > 1: with k = 1 they are the output), the alignment's
    buffers, and ``ALLOCATOR_SLACK`` for the rounding of its small tensors (CUDA's caching allocator
    hands out multiples of 512 bytes). The memory plan reserves this for the worst step."""
    slots, block_m = num_tokens * top_k, moe_blocks(num_tokens, top_k, num_experts).block_m
    rows = max_blocks(slots, num_experts, block_m)
    align = rows * block_m * 4 + rows * 4 + 4
    per_slot = slots * intermediate * itemsize
    if top_k > 1:
        per_slot += slots * hidden * itemsize
    return align + per_slot + ALLOCATOR_SLACK
