"""The transformers backend: any decoder-only ``*ForCausalLM`` transformers implements, run by
transformers' own modeling code with tandem's paged attention in place of its attention (the
``"tandem"`` attention function, ``transformers_attention``).

The model is built from the checkpoint's config.json (or a preset's fields) and its weights are read
through tandem's ``Getter`` by the transformers model's own parameter names, so checkpoints, random
presets and the leftover-tensor check work as for native families. A step's flat batch (many
sequences, each a chunk of new tokens) goes through the decoder as one sequence of T tokens with
tandem's positions as ``position_ids``: everything but attention works token by token, and attention
(the one place sequences must stay apart) is tandem's, which masks by sequence and causality. No
transformers KV cache (``use_cache=False``) and no attention mask (transformers builds none for an
attention implementation it has no mask function for).

Not supported: tensor parallelism (refused for tp > 1); piecewise CUDA graphs (the forward is one
piece, not a ``LayeredCausalLM``). Decode steps are captured in CUDA graphs where the forward can be
captured; where it cannot (``supports_cuda_graphs`` False, decided when loading on CUDA) the worker
runs every step eagerly. What is refused at load and why: ``transformers_config``,
``transformers_probe``."""
from __future__ import annotations

from typing import Any

import torch

from tandem.model.attention.base import StepAttention
from tandem.model.base import Getter, KVSpec
from tandem.model.model_config import ModelConfig
from tandem.model.models.transformers_attention import ATTENTION_NAME, StepContext, register
from tandem.model.models.transformers_config import build_hf_config, causal_lm_class, refuse_converted_checkpoints
from tandem.model.models.transformers_probe import probe
from tandem.model.tp_layout import TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps


def _build(model_cls: Any, hf_config: Any, get: Getter) -> torch.nn.Module:
    """The transformers model on the getter's device and dtype, with the getter's weights (read by
    the model's parameter names). Built once on the meta device to learn a first tensor's device and
    dtype, then for real without initialising weights it is about to overwrite."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        skeleton = model_cls._from_config(hf_config, attn_implementation=ATTENTION_NAME)
    first_name, first_param = next(iter(skeleton.named_parameters()))
    first = get(first_name, tuple(first_param.shape), None)
    del skeleton
    with torch.device(first.device), no_init_weights():
        hf = model_cls._from_config(hf_config, dtype=first.dtype, attn_implementation=ATTENTION_NAME)
    hf.tie_weights()
    refuse_converted_checkpoints(hf)
    with torch.no_grad():
        for name, param in hf.named_parameters():  # a tied head shares the embedding: listed once
            param.copy_(first if name == first_name else get(name, tuple(param.shape), None))
    return hf.eval().requires_grad_(False)


def _sliding_layers(hf_config: Any) -> tuple[bool, ...]:
    """Which layers the config makes sliding-window ones (the probe checks each passes its window)."""
    n = hf_config.num_hidden_layers
    if not getattr(hf_config, "sliding_window", None):
        return (False,) * n
    kinds = getattr(hf_config, "layer_types", None)
    return tuple(kind == "sliding_attention" for kind in kinds) if kinds else (True,) * n


def _logit_transforms(hf_config: Any) -> tuple[tuple[str, float], ...]:
    """What transformers' causal LMs do to the head's output, by the config fields they read
    (Granite's logits_scaling, Cohere's logit_scale, Gemma's final soft-cap); the probe checks that
    the result is the model's own logits."""
    fields = (("logits_scaling", "div"), ("logit_scale", "mul"), ("final_logit_softcapping", "softcap"))
    return tuple((op, float(getattr(hf_config, name))) for name, op in fields
                 if getattr(hf_config, name, None) is not None)


class TransformersModel:
    """A ``CausalLM`` (not layered: piecewise graphs skip it) around a transformers causal LM."""

    @classmethod
    def load(cls, config: ModelConfig, get: Getter, tp: TPLayout, max_positions: int,
             comm: SingleDevice | TensorParallelOps) -> TransformersModel:
        if tp.size > 1:
            raise NotImplementedError(f"the transformers backend runs {config.architecture} on one device only: "
                                      f"tensor_parallel_size={tp.size} is not supported for it")
        register()
        hf_config = build_hf_config(config, max_positions)
        return cls(config, _build(causal_lm_class(config.architecture, hf_config), hf_config, get), hf_config)

    @staticmethod
    def ignored_tensors(config: ModelConfig) -> tuple[str, ...]:
        """Rotary tables some exporters save, and an lm_head that tied embeddings replace."""
        return ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())

    def __init__(self, config: ModelConfig, hf: torch.nn.Module, hf_config: Any) -> None:
        self.config = config
        self.hf = hf
        self.decoder = hf.base_model
        self.head = hf.get_output_embeddings()
        if self.decoder is hf or not isinstance(self.head, torch.nn.Linear):
            raise NotImplementedError(f"{type(hf).__name__} is not a decoder with a linear output head")
        first = next(hf.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.context = StepContext()
        for module in hf.modules():  # the attention function finds the model's context through its module
            module.tandem_context = self.context
        self._transforms = _logit_transforms(hf_config)
        found = probe(hf, self.decoder, self.context, self.compute_logits, _sliding_layers(hf_config),
                      config.vocab_size)
        self.context.specs = found.specs
        self.kv_spec = KVSpec(found.num_kv_heads, found.head_dim, found.specs)
        # read by the worker: False where the decoder's forward cannot be captured in a CUDA graph
        self.supports_cuda_graphs = found.cuda_graphs or self.device.type != "cuda"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attn: StepAttention) -> torch.Tensor:
        """The flat batch as one sequence [1, T]; the attention function reads the step from the context."""
        self.context.kv_cache, self.context.attn = kv_cache, attn
        return self.decoder(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)[0][0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The head and the model's transforms of its output, in the model's dtype (into ``out`` when given)."""
        if out is None:
            logits = self.head(hidden)
        else:
            logits = torch.matmul(hidden, self.head.weight.t(), out=out)
            if self.head.bias is not None:
                logits.add_(self.head.bias)
        for op, value in self._transforms:
            if op == "div":
                logits.div_(value)
            elif op == "mul":
                logits.mul_(value)
            else:  # soft-cap, as transformers computes it: cap * tanh(logits / cap)
                logits.div_(value).tanh_().mul_(value)
        return logits
