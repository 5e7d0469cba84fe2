"""What the Hugging Face Llama-style decoders share, for the families under ``models/``: their
attention projections (q/k/v fused into one matrix, o), gated MLP (gate/up fused, down), embedding
and LM head read as rank ``tp.rank``'s parts of the checkpoint tensors (``TPLayout``), and the
logits over the whole vocabulary."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from tandem.model.base import Getter
from tandem.model.model_config import ModelConfig
from tandem.model.quant.linear import Weight, cat_rows, gemv_on, linear, read_linear
from tandem.model.tp_layout import TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps

LayerT = TypeVar("LayerT")


@dataclass
class ModelWeights(Generic[LayerT]):
    """A decoder's weights, each family's layers in its own dataclass."""

    embed: torch.Tensor
    layers: list[LayerT]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied


def attention_weights(cfg: ModelConfig, get: Getter, prefix: str, tp: TPLayout, bias: bool = False
                      ) -> tuple[Weight, Weight, torch.Tensor | None]:
    """(qkv [q + 2 kv, hidden], o [hidden, q], qkv bias or None) of ``{prefix}self_attn.*``: this
    rank's heads (``cfg`` is the whole model's config). The projections may be quantized weights
    (``quant.linear``: apply them with ``linear``)."""
    p = f"{prefix}self_attn."
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    q_part, kv_part = tp.q_part(cfg), tp.kv_part(cfg)
    qkv = [(f"{p}{n}_proj", size, part) for n, size, part in (("q", q, q_part), ("k", kv, kv_part), ("v", kv, kv_part))]
    return (cat_rows([read_linear(get, f"{name}.weight", (size, h), part) for name, size, part in qkv]),
            read_linear(get, f"{p}o_proj.weight", (h, q), tp.q_part(cfg, dim=1)),
            torch.cat([get(f"{name}.bias", (size,), part) for name, size, part in qkv]) if bias else None)


def mlp_weights(cfg: ModelConfig, get: Getter, prefix: str, tp: TPLayout) -> tuple[Weight, Weight]:
    """(gate_up [2 * intermediate, hidden], down [hidden, intermediate]) of ``{prefix}mlp.*``: this
    rank's columns, possibly quantized (as ``attention_weights``)."""
    h, inter, part = cfg.hidden_size, cfg.intermediate_size, tp.mlp_part(cfg)
    gate_up = cat_rows([read_linear(get, f"{prefix}mlp.{n}_proj.weight", (inter, h), part) for n in ("gate", "up")])
    return gate_up, read_linear(get, f"{prefix}mlp.down_proj.weight", (h, inter), tp.mlp_part(cfg, dim=1))


def embedding_and_head(cfg: ModelConfig, get: Getter, tp: TPLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, LM head): this rank's vocabulary rows; the head is the embedding itself when tied."""
    vocab = (cfg.vocab_size, cfg.hidden_size)
    embed = get("model.embed_tokens.weight", vocab, tp.vocab_part(cfg))
    return embed, embed if cfg.tie_word_embeddings else get("lm_head.weight", vocab, tp.vocab_part(cfg))


def lm_logits(hidden: torch.Tensor, lm_head: torch.Tensor, comm: SingleDevice | TensorParallelOps,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, V] in the model's dtype: the sampler widens bf16 as it reads (a float32 copy of every
    row would cost a pass over the logits). ``out``: where to write them (CUDA graphs share one
    buffer, so each captured batch size does not keep logits of its own)."""
    if out is None:
        return comm.gather_logits(linear(hidden, lm_head))
    if comm.size == 1:
        if gemv_on(hidden, lm_head):
            from tandem.kernels.gemv import gemv

            return gemv(hidden.contiguous(), lm_head, out=out)
        return torch.matmul(hidden, lm_head.t(), out=out)
    return out.copy_(comm.gather_logits(linear(hidden, lm_head)))


def ignored_tensors(config: ModelConfig) -> tuple[str, ...]:
    """Rotary tables some exporters save, and an lm_head that tied embeddings replace."""
    return ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())
