"""The mixture-of-experts decoder the Llama-style MoE families share (Qwen2-MoE, Qwen3-MoE, Mixtral):
Llama's attention (``LlamaModel``), then in each layer either a dense gated MLP or a sparse MoE block:

- the router ``gate`` [E, H] (replicated on every rank), softmax top-k (``layers/experts.route``);
- the experts' gated MLPs (``layers/experts.experts``: the plain PyTorch reference on the CPU, the
  fused Triton kernel on CUDA), weights w13 [E, 2I, H] and w2 [E, H, I];
- a shared expert (Qwen2-MoE) added to every token, scaled by sigmoid(``shared_expert_gate`` x).

On CUDA the block is only device work of static shapes (a linear, ``route``, ``experts``, elementwise
ops): no host synchronisation, so decode steps capture it into CUDA graphs, routing included.

Parallelism (``TPLayout``). Tensor parallelism splits every expert's intermediate dimension (w13's
gate rows and up rows alike, w2's columns), so each rank's block output is a partial sum, all-reduced
once after the block as after a dense MLP. Expert parallelism places whole experts on ranks (E/N
each): every rank routes all tokens, computes its own experts' contributions and the same one
all-reduce sums them. A route to an expert held elsewhere gets the sentinel id E/N (the local
expert count), which the experts (reference and fused kernel alike) drop: no rank computes a route
it does not own, and the route adds exactly zero. Shapes stay static: the kernel's buffers keep
their worst-case size, only the device-side count of rows in use shrinks. This is the simple,
correct form; for large expert counts the bandwidth-optimal one is an all-to-all dispatch: each
rank sends only its tokens to the ranks holding their experts and gets the results back (two
all-to-alls of T*k rows instead of an all-reduce of T rows per rank), which needs per-rank token
counts known on the device and a kernel taking variable row counts.

FP8 checkpoints: on the native FP8 path (``quant.reader.keeps_fp8``) the experts stay FP8 with their
scales (``quant.fp8_experts.Fp8Experts``, which the fused kernel and the reference both take), and
``--quantization fp8`` quantizes them per output channel; tensor and expert parallelism slice the
scales with the weights, and a block-wise split that cuts a scale block is refused at load, naming
the tensor and the sizes. 4-bit checkpoints (AWQ, GPTQ, pack-quantized) and ``--quantization int4``
keep them 4-bit where the W4A16 GEMM runs (``quant.int4_experts.Int4Experts``, read through
``quant.int4_linear.Int4Getter.expert``; words, scales and zero points sliced together, a split
that cuts a group refused at load; act-order experts dequantized). Elsewhere experts are
dequantized at load.

Checkpoint layouts: transformers' fused expert tensors (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I], router ``mlp.gate.weight``), or one tensor per expert and
projection as hub checkpoints and transformers' ``save_pretrained`` write them (``ExpertNames``).
Both load into the same w13 / w2."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tandem.model.base import Getter, MissingWeight
from tandem.model.layers.experts import experts, route
from tandem.model.layers.mlp import silu_mul
from tandem.model.model_config import ModelConfig
from tandem.model.models.decoder_parts import ModelWeights, attention_weights, embedding_and_head, mlp_weights
from tandem.model.quant.expert_weights import ExpertWeight, cat_expert_rows, stack_experts, with_expert_dim
from tandem.model.quant.linear import Weight, linear
from tandem.model.models.llama import LlamaModel, check_config
from tandem.model.moe_shape import MoEShape, moe_shape
from tandem.model.tp_layout import Part, TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps


@dataclass(frozen=True)
class MoESettings:
    """A family's MoE fields, parsed and checked by its module."""

    num_experts: int
    top_k: int
    renormalize: bool  # the top-k weights rescaled to sum to one
    expert_intermediate: int
    sparse_layers: tuple[bool, ...]  # per layer: an MoE block (True) or a dense MLP
    shared_intermediate: int = 0  # the shared expert's width; 0: none
    activation: str = "silu"


def required(hf: dict[str, Any], *keys: str) -> int:
    """The first of ``keys`` config.json sets, as an int: ValueError naming them if it sets none."""
    for key in keys:
        if hf.get(key) is not None:
            return int(hf[key])
    raise ValueError(f"config.json sets none of {list(keys)}, which a mixture-of-experts model needs")


def experts_of(cfg: ModelConfig) -> MoEShape:
    """The config's experts (``moe_shape``), checked: ValueError naming what does not describe a
    mixture of experts."""
    shape = moe_shape(cfg)
    if shape is None:
        raise ValueError(f"config.json sets no experts (num_experts / num_local_experts) for {cfg.architecture}")
    if not 1 <= shape.top_k <= shape.num_experts:
        raise ValueError(f"config.json sets num_experts_per_tok={shape.top_k} for {shape.num_experts} experts")
    return shape


@dataclass(frozen=True)
class ExpertNames:
    """One family's per-expert checkpoint names: ``{block}.experts.{e}.{gate|up|down}.weight`` and
    the router ``{block}.gate.weight`` under ``model.layers.{i}.`` (the fused layout is ``mlp.``)."""

    block: str
    gate: str
    up: str
    down: str


QWEN_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ExpertNames("block_sparse_moe", "w1", "w3", "w2")


@dataclass
class MoEWeights:
    """One layer's MoE block as this rank holds it."""

    router: torch.Tensor  # [E, H], every expert's row on every rank
    w13: ExpertWeight  # [local experts, 2 * local width, H]: dense, FP8 (Fp8Experts) or 4-bit (Int4Experts)
    w2: ExpertWeight  # [local experts, H, local width]
    first_expert: int  # the global id of local expert 0 (expert parallelism), else 0
    shared_gate_up: torch.Tensor | None = None  # [2 * local shared width, H]
    shared_down: torch.Tensor | None = None  # [H, local shared width]
    shared_gate: torch.Tensor | None = None  # [1, H]


@dataclass
class MoELayerWeights:
    """A decoder layer: Llama's attention weights (``LlamaModel`` reads them by name), then either
    ``experts`` or a dense MLP (``gate_up``, ``down``)."""

    input_norm: torch.Tensor
    qkv: Weight
    o: Weight
    post_norm: torch.Tensor
    experts: MoEWeights | None = None
    gate_up: Weight | None = None
    down: Weight | None = None
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


# --- loading ---------------------------------------------------------------------------------------
_NOTHING = Part(0, 0, 0, 0)  # an empty part of a tensor


def _expert_reader(get: Getter) -> Callable[[str, tuple[int, ...], Part | None], ExpertWeight]:
    """Reads experts' weights with a leading expert dimension ([1, N, K] for one expert's projection):
    through ``get.expert`` where the getter has it (``quant.reader.QuantizedGetter``: FP8 experts stay
    FP8 on the native path; ``quant.int4_linear.Int4Getter``: 4-bit experts stay 4-bit where the
    W4A16 GEMM runs), else dense."""
    read = getattr(get, "expert", None)
    if read is not None:
        return read
    return lambda name, shape, part: with_expert_dim(get(name, shape, part))


def _fused_w13(get: Getter, p: str, s: MoESettings, h: int, tp: TPLayout) -> ExpertWeight:
    """w13 from transformers' fused ``gate_up_proj``: this rank's experts, or its slice of each."""
    e, i, name, read = s.num_experts, s.expert_intermediate, f"{p}mlp.experts.gate_up_proj", _expert_reader(get)
    if tp.size == 1 or tp.expert_parallel:
        return read(name, (e, 2 * i, h), tp.experts_part(e))
    # the gate rows and the up rows of every expert, each split as a dense MLP's
    return cat_expert_rows([read(name, (e, 2 * i, h), tp.expert_mlp_part(i, 1, offset)) for offset in (0, i)], name)


def _fused_w2(get: Getter, p: str, s: MoESettings, h: int, tp: TPLayout) -> ExpertWeight:
    e, i = s.num_experts, s.expert_intermediate
    part = tp.experts_part(e) if tp.expert_parallel else tp.expert_mlp_part(i, 2)
    return _expert_reader(get)(f"{p}mlp.experts.down_proj", (e, h, i), part)


def _per_expert(get: Getter, p: str, s: MoESettings, h: int, tp: TPLayout,
                names: ExpertNames) -> tuple[ExpertWeight, ExpertWeight]:
    """(w13, w2) stacked from one tensor per expert and projection. An expert another rank holds
    (expert parallelism) is read as an empty part: its shape is checked and it counts as read,
    as every rank reads its part, possibly empty, of every tensor. FP8 experts keep their scales
    (sliced with their rows or columns); block-wise gate rows must end on a block to join the up rows."""
    i, mine, read = s.expert_intermediate, tp.experts(s.num_experts), _expert_reader(get)
    w13, w2 = [], []
    for e in range(s.num_experts):
        rows, cols = (tp.expert_mlp_part(i, 0), tp.expert_mlp_part(i, 1)) if e in mine else (_NOTHING, _NOTHING)
        q = f"{p}{names.block}.experts.{e}."
        gate_up = [read(f"{q}{names.gate}.weight", (i, h), rows), read(f"{q}{names.up}.weight", (i, h), rows)]
        down = read(f"{q}{names.down}.weight", (h, i), cols)
        if e in mine:
            w13.append(cat_expert_rows(gate_up, f"{q}{names.gate}/{names.up}"))
            w2.append(down)
    return stack_experts(w13), stack_experts(w2)


def _shared_expert(cfg: ModelConfig, get: Getter, p: str, s: MoESettings, tp: TPLayout
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_up, down, gate) of Qwen2-MoE's shared expert: split as a dense MLP is."""
    h, width = cfg.hidden_size, s.shared_intermediate
    rows, cols = tp.width_part(width, 0), tp.width_part(width, 1)  # under expert parallelism too
    q = f"{p}mlp.shared_expert."
    gate_up = torch.cat([get(f"{q}{n}_proj.weight", (width, h), rows) for n in ("gate", "up")])
    return gate_up, get(f"{q}down_proj.weight", (h, width), cols), get(f"{p}mlp.shared_expert_gate.weight", (1, h), None)


def load_moe(cfg: ModelConfig, get: Getter, p: str, s: MoESettings, tp: TPLayout, names: ExpertNames) -> MoEWeights:
    """Layer ``p``'s MoE block: the fused layout where the checkpoint has it, else one tensor per
    expert (random presets draw the fused tensors)."""
    h, e = cfg.hidden_size, s.num_experts
    try:
        w13 = _fused_w13(get, p, s, h, tp)
    except MissingWeight:
        (w13, w2), block = _per_expert(get, p, s, h, tp, names), names.block
    else:
        w2, block = _fused_w2(get, p, s, h, tp), "mlp"
    weights = MoEWeights(router=get(f"{p}{block}.gate.weight", (e, h), None), w13=w13, w2=w2,
                         first_expert=tp.experts(e).start)
    if s.shared_intermediate:
        weights.shared_gate_up, weights.shared_down, weights.shared_gate = _shared_expert(cfg, get, p, s, tp)
    return weights


def _layer(cfg: ModelConfig, get: Getter, i: int, s: MoESettings, tp: TPLayout, names: ExpertNames
           ) -> MoELayerWeights:
    p, h, d = f"model.layers.{i}.", cfg.hidden_size, cfg.head_dim
    qkv, o, qkv_bias = attention_weights(cfg, get, p, tp, bias=cfg.qkv_bias)
    layer = MoELayerWeights(
        input_norm=get(f"{p}input_layernorm.weight", (h,), None), qkv=qkv, o=o,
        post_norm=get(f"{p}post_attention_layernorm.weight", (h,), None), qkv_bias=qkv_bias,
        q_norm=get(f"{p}self_attn.q_norm.weight", (d,), None) if cfg.qk_norm else None,
        k_norm=get(f"{p}self_attn.k_norm.weight", (d,), None) if cfg.qk_norm else None)
    if s.sparse_layers[i]:
        layer.experts = load_moe(cfg, get, p, s, tp, names)
    else:
        layer.gate_up, layer.down = mlp_weights(cfg, get, p, tp)
    return layer


def load_weights(cfg: ModelConfig, get: Getter, s: MoESettings, tp: TPLayout = TPLayout(),
                 names: ExpertNames = QWEN_NAMES) -> ModelWeights[MoELayerWeights]:
    """``cfg`` is the whole model's config; the weights are rank ``tp.rank``'s parts of it."""
    embed, lm_head = embedding_and_head(cfg, get, tp)
    layers = [_layer(cfg, get, i, s, tp, names) for i in range(cfg.num_layers)]
    return ModelWeights(embed=embed, layers=layers, norm=get("model.norm.weight", (cfg.hidden_size,), None),
                        lm_head=lm_head)


# --- the forward -----------------------------------------------------------------------------------
def _local_routes(weights: torch.Tensor, ids: torch.Tensor, first: int, count: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert parallelism: routes to this rank's experts [first, first + count) as local ids; a
    route to an expert held elsewhere gets the sentinel ``count`` (one past the local experts),
    which ``experts`` drops: no GEMM work here, an exact zero, and the same shapes on every step
    and rank. The weights pass unchanged (a dropped route's is never read)."""
    local = ids - first
    here = (local >= 0) & (local < count)
    return weights, torch.where(here, local, torch.full_like(local, count))


def moe_mlp(hidden: torch.Tensor, w: MoEWeights, s: MoESettings,
            act: Callable[[torch.Tensor], torch.Tensor] = silu_mul) -> torch.Tensor:
    """[T, H] -> [T, H]: this rank's part of the block's output (all-reduced by the caller).
    ``act``: the shared expert's gated activation (the fused kernel on CUDA)."""
    topk_weights, topk_ids = route(F.linear(hidden, w.router), s.top_k, s.renormalize)
    local = w.w13.shape[0]
    if local < s.num_experts:
        topk_weights, topk_ids = _local_routes(topk_weights, topk_ids, w.first_expert, local)
    out = experts(hidden, w.w13, w.w2, topk_weights, topk_ids, s.activation)
    if w.shared_gate_up is not None:  # transformers adds it after the routed experts' sum
        shared = F.linear(act(F.linear(hidden, w.shared_gate_up)), w.shared_down)
        out = out + torch.sigmoid(F.linear(hidden, w.shared_gate)) * shared
    return out


class MoEDecoder(LlamaModel):
    """Llama's decoder (attention, norms, rotary, the embedding and head, tensor parallelism) with
    a sparse MoE block in the layers ``settings.sparse_layers`` marks, a dense MLP in the others.

    A family subclasses it with its checkpoint ``names`` and ``family_settings``, the parser of its
    config fields."""

    names: ExpertNames = QWEN_NAMES
    family_settings: Callable[[ModelConfig], MoESettings]

    @classmethod
    def load(cls, config: ModelConfig, get: Getter, tp: TPLayout, max_positions: int,
             comm: SingleDevice | TensorParallelOps) -> MoEDecoder:
        check_config(config)
        settings = cls.family_settings(config)
        weights = load_weights(config, get, settings, tp, cls.names)
        return cls(tp.local_config(config), settings, weights, max_positions, comm)

    def __init__(self, config: ModelConfig, settings: MoESettings, weights: ModelWeights[MoELayerWeights],
                 max_positions: int, comm: SingleDevice | TensorParallelOps | None = None) -> None:
        super().__init__(config, weights, max_positions, comm)
        self.moe = settings

    def after_attention(self, i: int, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of layer i: output projection, norm (adding the residual), then its MoE block or
        dense MLP; one all-reduce after either."""
        layer = self.weights.layers[i]
        attn = self.comm.reduce(linear(attn_out, layer.o))
        hidden, residual = self._add_norm(attn, residual, layer.post_norm, self.config.rms_norm_eps)
        if layer.experts is None:
            out = linear(self._silu_mul(linear(hidden, layer.gate_up)), layer.down)
        else:
            out = moe_mlp(hidden, layer.experts, self.moe, self._silu_mul)
        return self.comm.reduce(out), residual
