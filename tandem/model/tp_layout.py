"""Which part of every weight a tensor-parallel rank holds (plain arithmetic, no communication).

Rank r of N holds query heads [r*H/N, (r+1)*H/N), the KV heads those query heads read (KV heads are
replicated when there are fewer than ranks: each rank then holds the one its query heads share), rows
[r*I/N, (r+1)*I/N) of the MLP's gate and up projections, the matching columns of o_proj and
down_proj (row-parallel: each rank's product is a partial sum the model all-reduces), and rows
[r*V', (r+1)*V') of the embedding and LM head, V' = ceil(V/N) (the last shard is zero-padded).
Norms are replicated. With N = 1 every part is the whole tensor."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tandem.model.model_config import ModelConfig


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

    def check(self, cfg: ModelConfig) -> None:
        """Refuse a model this many ranks cannot split evenly (before any process starts)."""
        n, kv = self.size, cfg.num_kv_heads
        problems = []
        if cfg.num_heads % n:
            problems.append(f"its {cfg.num_heads} attention heads are not a multiple of {n}")
        if kv % n and n % kv:
            problems.append(f"its {kv} KV heads are neither a multiple nor a divisor of {n}")
        if cfg.intermediate_size % n:
            problems.append(f"its intermediate size {cfg.intermediate_size} is not a multiple of {n}")
        if problems:
            raise ValueError(f"tensor_parallel_size={n} cannot split this {cfg.architecture}: " + "; ".join(problems))

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

    def vocab_part(self, cfg: ModelConfig) -> Part | None:
        """embed_tokens / lm_head rows, padded to the same count on every rank."""
        if self.size == 1:
            return None
        rows, start = self.vocab_rows(cfg), self.first_vocab_row(cfg)
        return Part(0, min(start, cfg.vocab_size), min(start + rows, cfg.vocab_size), rows)
