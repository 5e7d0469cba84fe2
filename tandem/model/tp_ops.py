"""The forward's collectives: what changes in ``LlamaModel`` when its weights are split over ranks.

``SingleDevice`` is the identity (one GPU, the CPU). ``TensorParallelOps`` works over a
torch.distributed process group (NCCL on CUDA, gloo on CPU): the embedding looks up the rows this rank
holds and all-reduces (every other rank adds zeros, so the sum is exact); the row-parallel output of
o_proj and down_proj is all-reduced; the LM head's logits are all-gathered, so every rank holds the
same full logits and samples the same tokens. Each call is an ordinary stream-ordered collective:
captured into CUDA graphs like any other kernel."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.model.model_config import ModelConfig
from tandem.model.symm_allreduce import OneShotAllReduce, make_one_shot
from tandem.model.tp_layout import TPLayout


def all_gather_rows(out: torch.Tensor, local: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Every rank's ``local`` stacked along dim 0 into ``out``. all_gather_single replaces
    all_gather_into_tensor in recent torch; older ones (2.11) have only the latter."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


class SingleDevice:
    size = 1

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, table)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        return local


class TensorParallelOps:
    def __init__(self, group: dist.ProcessGroup, layout: TPLayout, cfg: ModelConfig) -> None:
        self.group, self.size = group, layout.size
        self.rows, self.first_row = layout.vocab_rows(cfg), layout.first_vocab_row(cfg)
        self.vocab_size = cfg.vocab_size
        self.one_shot: OneShotAllReduce | None = None  # small reduces on CUDA (see ``use_one_shot``)

    def use_one_shot(self, device: torch.device, dtype: torch.dtype) -> None:
        """Small all-reduces (decode steps) through symmetric memory where it works (collective:
        every rank calls it)."""
        self.one_shot = make_one_shot(self.group, device, dtype)

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows of ids outside this rank's vocabulary shard are zero before the all-reduce."""
        local = ids - self.first_row
        outside = (local < 0) | (local >= self.rows)
        rows = F.embedding(local.clamp(0, self.rows - 1), table)
        return self.reduce(rows.masked_fill_(outside[:, None], 0))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.one_shot is not None and self.one_shot.takes(partial):
            return self.one_shot(partial)
        dist.all_reduce(partial, group=self.group)
        return partial

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[S, V'] per rank -> [S, V] on every rank (padding rows of the last shard dropped)."""
        n_rows = local.shape[0]
        out = local.new_empty(self.size * n_rows, self.rows)
        all_gather_rows(out, local.contiguous(), self.group)
        full = out.view(self.size, n_rows, self.rows).transpose(0, 1).reshape(n_rows, self.size * self.rows)
        return full[:, :self.vocab_size].contiguous()  # a no-op unless V' * N > V
