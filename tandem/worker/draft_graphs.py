"""The draft model's proposals as one fixed-shape device function, and its CUDA graphs.

``uniform_drafts`` takes every row's last k + 1 tokens (positions n-k-1 .. n-1; K/V the draft cache
already holds for some of them is rewritten with the same token's), takes the argmax after the
last, then k - 1 one-token steps, each fed the previous argmax. Positions, KV slots (gathered from
the block table) and context lengths are computed on the device from the rows' start positions, so
nothing the host reads depends on the data and the whole proposal can be captured: an eager
forward of an 8B draft at batch 1 costs ~12 ms of host launches, a replay ~6 ms.

A row may take fewer than k proposals (``kk``, near max_model_len or max_tokens): it still runs the
k steps, but a step past its own writes its K/V to the padding slot and clamps its position to the
row's last kept one, so it neither overwrites K/V the row keeps nor reads past its blocks; its extra
drafts are discarded. Padding rows (graph buckets) have kk = 0 and an all-zero block table: they
write into block 0 only, which is never handed out.

``DraftGraphs`` captures the function per (padded batch size, k) at start-up (``capture_all``; any
other pair lazily on first use), into its own memory pool (never the engine's), on a side stream
ordered after and before the current stream (the step's compute stream: the engine's draft
proposes inside the step, ``worker.draft_window``)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.base import CausalLM
from tandem.worker.cuda_graphs import capture_sizes

logger = logging.getLogger(__name__)

PAD_SLOT = 0  # in block 0, the padding block


@dataclass
class DraftModel:
    """What the proposal function needs of the draft: its model, cache and how to read its logits."""

    model: CausalLM
    kv_cache: torch.Tensor
    block_size: int
    vocab_size: int  # the target's: a padded draft vocabulary's extra logits are never proposed


def _slots(table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slots of positions ``pos`` [B, m] through each row's block table [B, W] (a gather: no host
    values). The block index is clamped to the table so no position can read outside it."""
    block = (pos // block_size).clamp(max=table.shape[1] - 1)
    return table.gather(1, block) * block_size + pos % block_size


def _next_tokens(d: DraftModel, ids: torch.Tensor, pos: torch.Tensor, inputs: AttentionInputs,
                 rows: slice | None) -> torch.Tensor:
    hidden = d.model.forward(ids, pos, d.kv_cache, step_attention(inputs))
    if rows is not None:
        hidden = hidden[rows].contiguous()
    return d.model.compute_logits(hidden)[:, :d.vocab_size].argmax(dim=-1)


def uniform_drafts(d: DraftModel, ids: torch.Tensor, start: torch.Tensor, kk: torch.Tensor,
                   table: torch.Tensor) -> torch.Tensor:
    """ids [B, k+1] (each row's last k + 1 tokens), start [B] (the first one's position), kk [B] (the
    proposals each row keeps, <= k), table [B, W] -> drafts [B, k], without host synchronisation."""
    num_rows, width = ids.shape
    k, bs, dev = width - 1, d.block_size, ids.device
    pos = start[:, None] + torch.arange(width, device=dev)
    first = AttentionInputs(_slots(table, pos, bs).flatten(), table, torch.arange(num_rows + 1, device=dev) * width,
                            start + width, pos.flatten(), width, bs)  # max_q: a host value fixed by the shape
    token = _next_tokens(d, ids.flatten(), pos.flatten(), first, slice(k, None, width))
    drafts = [token]
    last_kept = start + k + kk - 1  # position n + kk - 2: the last draft fed back is kept there
    one_each = torch.arange(num_rows + 1, device=dev)
    for step in range(1, k):
        pos = torch.minimum(start + k + step, last_kept)
        slots = torch.where(kk > step, _slots(table, pos[:, None], bs)[:, 0], PAD_SLOT)
        inputs = AttentionInputs(slots, table, one_each, pos + 1, pos, 1, bs)
        token = _next_tokens(d, token, pos, inputs, None)
        drafts.append(token)
    return torch.stack(drafts, dim=1)


def pack_rows(ids: np.ndarray, start: np.ndarray, kk: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The inputs as one int64 array (one host-to-device copy): ids, start, kk, then the table."""
    return np.concatenate([ids.ravel(), start, kk, table.ravel()]).astype(np.int64, copy=False)


def unpack_rows(data: torch.Tensor, num_rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Views of ``pack_rows``' layout on the device: (ids, start, kk, table)."""
    n_ids = num_rows * (k + 1)
    ids = data[:n_ids].view(num_rows, k + 1)
    start, kk = data[n_ids:n_ids + num_rows], data[n_ids + num_rows:n_ids + 2 * num_rows]
    return ids, start, kk, data[n_ids + 2 * num_rows:].view(num_rows, -1)


def run_eager(d: DraftModel, ids: np.ndarray, start: np.ndarray, kk: np.ndarray, table: np.ndarray) -> torch.Tensor:
    """The same function without graphs (the CPU, ``cuda_graphs`` off, a batch beyond the buckets)."""
    data = torch.as_tensor(pack_rows(ids, start, kk, table), device=d.kv_cache.device)
    return uniform_drafts(d, *unpack_rows(data, len(ids), ids.shape[1] - 1))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    data: torch.Tensor  # static: ids, start, kk of the padded batch
    table: torch.Tensor  # static [bucket, max_blocks]
    drafts: torch.Tensor  # static output [bucket, k]


class DraftGraphs:
    def __init__(self, draft: DraftModel, max_seqs: int, max_blocks: int) -> None:
        self.draft, self.max_blocks = draft, max_blocks
        self.sizes = capture_sizes(max_seqs)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # the draft's own: the engine's pool stays as captured
        self.stream = torch.cuda.Stream(draft.kv_cache.device)

    def capture_all(self, k: int) -> None:
        """Every bucket's graph for k proposals, at start-up: a capture mid-run would stall the step
        that meets it (a warm-up and k forwards of the draft), and start-up has nothing in flight."""
        for size in self.sizes:
            if (size, k) not in self.graphs:
                self._capture(size, k)

    def bucket(self, num_rows: int) -> int | None:
        return next((s for s in self.sizes if s >= num_rows), None)

    def run(self, ids: np.ndarray, start: np.ndarray, kk: np.ndarray, table: np.ndarray) -> torch.Tensor:
        """drafts [rows, k] on the current stream, from host arrays (the proposer on known tokens)."""
        dev = self.draft.kv_cache.device
        data = torch.as_tensor(pack_rows(ids, start, kk, table), device=dev)
        return self.run_tensors(*unpack_rows(data, len(ids), ids.shape[1] - 1))

    def run_tensors(self, ids: torch.Tensor, start: torch.Tensor, kk: torch.Tensor,
                    table: torch.Tensor) -> torch.Tensor:
        """drafts [rows, k] on the current stream from device tensors: stage the rows into the
        bucket's static inputs (padding rows: zeros, block 0), replay."""
        num_rows, k = ids.shape[0], ids.shape[1] - 1
        size = self.bucket(num_rows)
        if size is None or table.shape[1] > self.max_blocks:
            return uniform_drafts(self.draft, ids, start, kk, table)
        g = self.graphs.get((size, k)) or self._capture(size, k)
        g.data.zero_()
        static_ids, static_start, static_kk, _ = unpack_rows(g.data, size, k)
        static_ids[:num_rows].copy_(ids)
        static_start[:num_rows].copy_(start)
        static_kk[:num_rows].copy_(kk)
        g.table.zero_()  # padding rows and columns point at block 0
        g.table[:num_rows, :table.shape[1]].copy_(table)
        g.graph.replay()
        return g.drafts[:num_rows]

    def _capture(self, size: int, k: int) -> _Graph:
        """Capture on first use, from padding inputs (every row in block 0): a warm-up run first (kernel
        compilation, lazy initialisation), then the capture, on a side stream ordered with the
        proposer's (the current one) both ways."""
        t0 = time.perf_counter()
        dev = self.draft.kv_cache.device
        data = torch.zeros(size * (k + 3), dtype=torch.int64, device=dev)
        table = torch.zeros(size, self.max_blocks, dtype=torch.int64, device=dev)
        ids, start, kk, _ = unpack_rows(data, size, k)
        current = torch.cuda.current_stream(dev)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            uniform_drafts(self.draft, ids, start, kk, table)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine's other threads (the async executor) may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                drafts = uniform_drafts(self.draft, ids, start, kk, table)
        current.wait_stream(self.stream)
        g = self.graphs[size, k] = _Graph(graph, data, table, drafts)
        logger.info("captured the draft's proposal graph for %d rows, k=%d in %.2f s", size, k,
                    time.perf_counter() - t0)
        return g
