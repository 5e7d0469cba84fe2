"""A mixture-of-experts model's sizes, from its config: what the roofline's floor and the memory plan
count. Torch-free (the host's benchmark code reads it).

Read from ``config.json`` as transformers reads it: experts ``num_experts`` (Qwen3-MoE; transformers
5 writes ``num_local_experts``, Mixtral's name), ``num_experts_per_tok``, each expert's width
``moe_intermediate_size`` (Qwen3-MoE) or ``intermediate_size`` (Mixtral); which layers are sparse from
``mlp_only_layers`` and ``decoder_sparse_step`` (the others keep a dense MLP of
``intermediate_size``); a shared expert of ``shared_expert_intermediate_size`` where the config has
one (Qwen2-MoE's, with its one-unit gate)."""
from __future__ import annotations

from dataclasses import dataclass

from tandem.model.model_config import ModelConfig


@dataclass(frozen=True)
class MoEShape:
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate: int  # each expert's I: w13 [E, 2I, H], w2 [E, H, I]
    sparse_layers: tuple[int, ...]  # layer indices with routed experts
    dense_layers: tuple[int, ...]  # the others: a dense gated MLP of ``dense_intermediate``
    dense_intermediate: int
    shared_intermediate: int = 0  # a shared expert's width, 0 if none

    @property
    def expert_params(self) -> int:
        """One expert of one layer: gate, up and down."""
        return 3 * self.hidden_size * self.expert_intermediate

    @property
    def always_read_params(self) -> int:
        """The MLP parameters every token reads, over all layers: dense MLPs, routers, shared experts."""
        h = self.hidden_size
        shared = 3 * h * self.shared_intermediate + h if self.shared_intermediate else 0
        return len(self.dense_layers) * 3 * h * self.dense_intermediate + len(self.sparse_layers) * (
            self.num_experts * h + shared)

    def expected_distinct_experts(self, tokens: int) -> float:
        """Experts a layer reads for ``tokens`` tokens, in expectation, when each token picks k of E
        uniformly and independently: E * (1 - (1 - k/E)^tokens) (k for one token, towards E for
        many). The floor is computed on the host, which never sees the routing (reading it back
        would be a sync). Uniform routing touches the most experts: a skewed router reads fewer,
        so there the floor counts more bytes than the step needs. Random-weight presets route
        close to uniformly."""
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** tokens)


_DEFAULT_TOP_K = {"Qwen3MoeForCausalLM": 8, "Qwen2MoeForCausalLM": 4}  # transformers' defaults (Mixtral: 2)


def moe_shape(cfg: ModelConfig) -> MoEShape | None:
    """The MoE sizes of ``cfg``, or None for a dense model."""
    hf = cfg.hf
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    if experts == 0:
        return None
    step = int(hf.get("decoder_sparse_step") or 1)
    dense_only = set(hf.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(cfg.num_layers) if i not in dense_only and (i + 1) % step == 0)
    return MoEShape(
        num_experts=experts, top_k=int(hf.get("num_experts_per_tok") or _DEFAULT_TOP_K.get(cfg.architecture, 2)),
        hidden_size=cfg.hidden_size,
        expert_intermediate=int(hf.get("moe_intermediate_size") or cfg.intermediate_size), sparse_layers=sparse,
        dense_layers=tuple(i for i in range(cfg.num_layers) if i not in sparse),
        dense_intermediate=cfg.intermediate_size,
        shared_intermediate=int(hf.get("shared_expert_intermediate_size") or 0))
