"""Which part of every weight a tensor-parallel rank holds (plain arithmetic, no communication).

Rank r of N holds query heads [r*H/N, (r+1)*H/N), the KV heads those query heads read (KV heads are
replicated when there are fewer than ranks: each rank then holds the one its query heads share), rows
[r*I/N, (r+1)*I/N) of the MLP's gate and up projections, the matching columns of o_proj and
down_proj (row-parallel: each rank's product is a partial sum the model all-reduces), and rows
[r*V', (r+1)*V') of the embedding and LM head, V' = ceil(V/N) (the last shard is zero-padded).
Norms are replicated. With N = 1 every part is the whole tensor.

Mixture-of-experts layers (``moe_shape``): the router is replicated; every expert's intermediate
dimension is split as a dense MLP's is (rows of its gate and up projections, columns of its down
projection), or, under expert parallelism (``expert_parallel``), rank r holds whole experts
[r*E/N, (r+1)*E/N). Dense MLP layers and shared experts are split as dense MLPs either way."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tandem.model.model_config import ModelConfig
from tandem.model.moe_shape import MoEShape, moe_shape


@dataclass(frozen=True)
class Part:
    """Elements [start, stop) of dimension ``dim``, zero-padded up to ``size`` elements."""

    dim: int
    start: int
    stop: int
    size: int


@dataclass(frozen=True)
class TPLayout:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # whole experts per rank instead of a slice of every expert

    def check(self, cfg: ModelConfig) -> None:
        """Refuse a model this many ranks cannot split evenly (before any process starts)."""
        n, kv = self.size, cfg.num_kv_heads
        problems = []
        if cfg.num_heads % n:
            problems.append(f"its {cfg.num_heads} attention heads are not a multiple of {n}")
        if kv % n and n % kv:
            problems.append(f"its {kv} KV heads are neither a multiple nor a divisor of {n}")
        moe = moe_shape(cfg)
        if moe is None:
            if self.expert_parallel:
                raise ValueError(f"enable_expert_parallel is set, but {cfg.architecture} is not a "
                                 "mixture-of-experts model: it has no experts to place on ranks")
            widths = [("intermediate size", cfg.intermediate_size)]
        else:
            widths = self._moe_widths(moe)
            if self.expert_parallel and moe.num_experts % n:
                problems.append(f"its {moe.num_experts} experts are not a multiple of {n} (expert parallelism "
                                "places whole experts, the same number on every rank)")
        problems += [f"its {what} {size} is not a multiple of {n}" for what, size in widths if size % n]
        if problems:
            raise ValueError(f"tensor_parallel_size={n}{' with expert parallelism' if self.expert_parallel else ''} "
                             f"cannot split this {cfg.architecture}: " + "; ".join(problems))

    def _moe_widths(self, moe: MoEShape) -> list[tuple[str, int]]:
        """The MLP widths tensor parallelism splits: every expert's unless whole experts are placed,
        the shared expert's and the dense layers' always."""
        widths = [] if self.expert_parallel else [("expert intermediate size", moe.expert_intermediate)]
        if moe.shared_intermediate:
            widths.append(("shared expert intermediate size", moe.shared_intermediate))
        if moe.dense_layers:
            widths.append(("intermediate size", moe.dense_intermediate))
        return widths

    # --- local sizes ---------------------------------------------------------------------------
    def heads(self, cfg: ModelConfig) -> int:
        return cfg.num_heads // self.size

    def kv_heads(self, cfg: ModelConfig) -> int:
        return max(1, cfg.num_kv_heads // self.size)

    def vocab_rows(self, cfg: ModelConfig) -> int:
        return -(-cfg.vocab_size // self.size)

    def first_vocab_row(self, cfg: ModelConfig) -> int:
        return self.rank * self.vocab_rows(cfg)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model as this rank computes it: its heads, KV heads and MLP width (the vocabulary
        stays whole: token ids and sampled logits are global)."""
        if self.size == 1:
            return cfg
        return dataclasses.replace(cfg, num_heads=self.heads(cfg), num_kv_heads=self.kv_heads(cfg),
                                   intermediate_size=cfg.intermediate_size // self.size)

    # --- parts of each weight ------------------------------------------------------------------
    def _span(self, dim: int, start: int, count: int) -> Part | None:
        return None if self.size == 1 else Part(dim, start, start + count, count)

    def q_part(self, cfg: ModelConfig, dim: int = 0) -> Part | None:
        """q_proj rows (weight, bias); o_proj columns with ``dim=1``."""
        per = self.heads(cfg) * cfg.head_dim
        return self._span(dim, self.rank * per, per)

    def kv_part(self, cfg: ModelConfig) -> Part | None:
        """k_proj / v_proj rows: the KV heads this rank's query heads attend with."""
        group = cfg.num_heads // cfg.num_kv_heads  # query heads per KV head
        first = self.rank * self.heads(cfg) // group
        return self._span(0, first * cfg.head_dim, self.kv_heads(cfg) * cfg.head_dim)

    def mlp_part(self, cfg: ModelConfig, dim: int = 0) -> Part | None:
        """gate_proj / up_proj rows; down_proj columns with ``dim=1``."""
        per = cfg.intermediate_size // self.size
        return self._span(dim, self.rank * per, per)

    def experts(self, num_experts: int) -> range:
        """The experts whose weights this rank holds (all of them unless expert-parallel)."""
        if not self.expert_parallel:
            return range(num_experts)
        per = num_experts // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def experts_part(self, num_experts: int) -> Part | None:
        """Dim 0 of fused expert tensors ([E, ...]): this rank's experts."""
        local = self.experts(num_experts)
        return self._span(0, local.start, len(local)) if self.expert_parallel else None

    def width_part(self, width: int, dim: int, offset: int = 0) -> Part | None:
        """A gated MLP of intermediate size ``width`` (a shared expert, an expert): its gate or up
        rows (``offset`` where they start along ``dim``) or its down columns: this rank's slice."""
        per = width // self.size
        return self._span(dim, offset + self.rank * per, per)

    def expert_mlp_part(self, width: int, dim: int, offset: int = 0) -> Part | None:
        """An expert's gate or up rows (dim 0 of its own tensor, dim 1 of the fused [E, 2I, H] with
        ``offset`` I for up) or its down columns (dim 1, or 2 of the fused [E, H, I]): this rank's
        slice of the intermediate dimension, or all of it under expert parallelism."""
        return None if self.expert_parallel else self.width_part(width, dim, offset)

    def vocab_part(self, cfg: ModelConfig) -> Part | None:
        """embed_tokens / lm_head rows, padded to the same count on every rank."""
        if self.size == 1:
            return None
        rows, start = self.vocab_rows(cfg), self.first_vocab_row(cfg)
        return Part(0, min(start, cfg.vocab_size), min(start + rows, cfg.vocab_size), rows)
