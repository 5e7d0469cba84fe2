"""For the transformers backend: the transformers config and model class of a checkpoint (or a
preset), and every reason, known from the config and the class alone, to refuse running it.

What can only be seen by running the model (which attention each layer computes, other mixing of
tokens, transforms of the logits) is checked in ``transformers_probe``."""
from __future__ import annotations

from typing import Any

from tandem.model.model_config import ModelConfig

# layer kinds tandem's paged attention computes (transformers' ``layer_types`` names)
_ATTENTION_LAYERS = ("full_attention", "sliding_attention")
# model types whose layers are (partly) not attention: recurrent, state-space, linear attention
# (others are caught by running the model: ``transformers_probe``)
_NOT_ATTENTION_IN_NAME = ("mamba", "rwkv", "xlstm", "recurrent", "hybrid", "linear", "jamba", "zamba", "lfm")
_NOT_ATTENTION = frozenset({"bamba", "falcon_h1", "qwen3_next", "qwen3_5", "qwen3_5_moe", "minimax", "nemotron_h"})
# rope variants that rescale with the current sequence length: transformers takes it from the batch's
# largest position, which in a flat batch of many sequences belongs to another sequence
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # "dynamic" in a name: every dynamic variant, as transformers
_RELATIVE_POSITIONS = ("alibi", "use_alibi", "position_bias_max_distance", "relative_attention_num_buckets")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json as read, or for a preset (no file) one written from its fields."""
    if config.hf:
        return dict(config.hf)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    return {"architectures": [config.architecture], "model_type": _model_type_of(config.architecture),
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size, "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings, "rope_parameters": rope,
            "tie_word_embeddings": config.tie_word_embeddings, "sliding_window": config.sliding_window,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids or None}


def _model_type_of(architecture: str) -> str:
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name == architecture]
    if not types:
        raise ValueError(f"transformers {_transformers_version()} implements no causal LM {architecture!r}")
    own = architecture.removesuffix("ForCausalLM") + "Config"
    return next((t for t in types if CONFIG_MAPPING[t].__name__ == own), types[0])


def refuse_by_config(cfg: dict[str, Any]) -> None:
    """Reasons in config.json alone (no transformers needed) not to run a checkpoint."""
    if cfg.get("auto_map"):
        raise NotImplementedError(f"config.json has auto_map {sorted(cfg['auto_map'])}: the checkpoint ships its own "
                                  "modeling code (trust_remote_code), which tandem never runs")
    if cfg.get("is_encoder_decoder"):
        raise NotImplementedError("config.json sets is_encoder_decoder=True: tandem runs decoder-only models")
    multimodal = sorted(k for k in cfg if k.endswith(("vision_config", "audio_config", "text_config")))
    if multimodal:
        raise NotImplementedError(f"config.json has {multimodal}: a multimodal model; tandem runs text-only "
                                  "decoders")
    model_type = str(cfg.get("model_type", ""))
    if model_type in _NOT_ATTENTION or any(kind in model_type for kind in _NOT_ATTENTION_IN_NAME):
        raise NotImplementedError(f"model_type {model_type!r} has recurrent, state-space or linear-attention "
                                  "layers; tandem's KV cache serves attention layers only")
    kinds = sorted(set(cfg.get("layer_types") or ()) - set(_ATTENTION_LAYERS))
    if kinds:
        raise NotImplementedError(f"config.json sets layer_types {kinds}; tandem's paged attention computes "
                                  f"{list(_ATTENTION_LAYERS)} layers only")
    relative = sorted(k for k in _RELATIVE_POSITIONS if cfg.get(k))
    if relative or cfg.get("position_embedding_type") not in (None, "absolute", "rope", "rotary"):
        raise NotImplementedError(f"config.json sets {relative or ['position_embedding_type']}: ALiBi or relative "
                                  "position attention, which tandem's paged attention cannot apply")


def refuse_rope(hf_config: Any, max_positions: int) -> None:
    """Rope types transformers rescales with the sequence's length run exactly only within the length
    they were trained at (there, they are plain rope): longer contexts are refused."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    per_layer = params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params]
    for rope in per_layer:
        kind = rope.get("rope_type", "default")
        if not any(variant in kind for variant in _LENGTH_DEPENDENT_ROPE):
            continue
        limit = (rope.get("original_max_position_embeddings") if kind == "longrope" else None) \
            or hf_config.max_position_embeddings
        if max_positions > limit:
            raise ValueError(f"max_model_len={max_positions} with rope_type {kind!r}: transformers rescales this "
                             f"rope beyond {limit} positions by the longest sequence of the batch, and tandem's "
                             f"flat batch mixes sequences; set max_model_len <= {limit}")


def build_hf_config(config: ModelConfig, max_positions: int) -> Any:
    """The transformers config object of the checkpoint (or preset), after the config-only refusals;
    ``max_positions``: the longest context tandem will run it at."""
    from transformers import CONFIG_MAPPING

    cfg = hf_config_dict(config)
    refuse_by_config(cfg)
    model_type = cfg.get("model_type") or _model_type_of(config.architecture)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json's model_type {model_type!r} is unknown to transformers "
                         f"{_transformers_version()}")
    hf_config = CONFIG_MAPPING[model_type].from_dict(cfg)
    if hf_config.sub_configs:
        raise NotImplementedError(f"{model_type} has sub-models {sorted(hf_config.sub_configs)}: a multimodal or "
                                  "composite model; tandem runs text-only decoders")
    refuse_rope(hf_config, max_positions)
    return hf_config


def causal_lm_class(architecture: str, hf_config: Any) -> Any:
    """transformers' class for ``architecture``, checked to be a decoder-only causal LM of this
    config whose attention goes through the attention interface."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, architecture, None)
    if cls is None or architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise ValueError(f"unsupported architecture {architecture!r}: neither tandem nor transformers "
                         f"{_transformers_version()} implements it as a causal LM")
    if not isinstance(hf_config, cls.config_class):
        raise ValueError(f"config.json's model_type {hf_config.model_type!r} does not belong to {architecture} "
                         f"(which takes {cls.config_class.__name__})")
    if not (cls._supports_attention_backend or cls._can_set_attn_implementation()):
        raise NotImplementedError(f"{architecture}'s attention does not go through transformers' attention "
                                  "interface, so tandem's paged attention cannot replace it")
    return cls


def refuse_converted_checkpoints(hf: Any) -> None:
    """transformers renames or fuses some models' checkpoint tensors as it loads them (mixture-of-experts
    weights stacked into one tensor, for instance); the backend reads tensors by the model's own names."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    conversions = get_model_conversion_mapping(hf, add_legacy=False)
    if conversions:
        raise NotImplementedError(f"transformers converts {type(hf).__name__}'s checkpoint tensors as it loads them "
                                  f"({type(conversions[0]).__name__} {conversions[0].source_patterns} -> "
                                  f"{conversions[0].target_patterns}), which the transformers backend does not do")
