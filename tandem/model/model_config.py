"""A Hugging Face ``config.json`` as one plain dataclass: the fields every decoder family shares (and the
host side needs), plus the whole file (``hf``) for the family's own fields, which its model parses
and checks when it loads. Torch-free: the API process reads configs too."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.model.registry import Family, family_of

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Types whose frequencies transformers recomputes from each sequence's length: tandem runs them only
# within the length where they are fixed (layers/rotary.py says why)
POSITION_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None  # the window of the layers that slide (all of them unless layer_windows)
    layer_windows: tuple[int | None, ...] | None = None  # per layer, where layers differ (None: full attention)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    hf: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read: families parse their own fields

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        return self.layer_windows if self.layer_windows is not None else (self.sliding_window,) * self.num_layers

    def num_params(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + self.hidden_size


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def rope_of(cfg: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling or None). transformers 5 writes ``rope_parameters``, per layer type for models
    whose layer types differ (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``);
    4.x writes ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    if layer_type in params:
        params = params[layer_type] or {}
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return theta, None if scaling is None else _resolved_scaling(scaling, cfg)


def _resolved_scaling(scaling: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The rope dict with its type checked and the values transformers derives when they are missing
    filled in, so that the rotary tables need nothing else from the config; None for plain rope."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # 4.x files may say "type"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return None
    scaling = {**scaling, "rope_type": rope_type}
    max_positions = int(cfg.get("max_position_embeddings", 4096))
    if rope_type == "dynamic":  # transformers' dynamic NTK counts from max_position_embeddings, whatever is set
        scaling["original_max_position_embeddings"] = max_positions
    elif rope_type in ("llama3", "yarn", "longrope"):  # a top-level value (Phi-3 keeps it there) wins, as in 5.x
        original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(original or max_positions)
    if rope_type in ("yarn", "longrope") and scaling.get("factor") is None:
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    return scaling


def rope_position_limit(scaling: dict[str, Any] | None) -> int | None:
    """How many positions fixed rotary tables reproduce transformers for: the original length for the
    position-dependent types, None (no limit) for the others."""
    if scaling is None or scaling["rope_type"] not in POSITION_DEPENDENT_ROPE_TYPES:
        return None
    return scaling["original_max_position_embeddings"]


def check_rope_positions(scaling: dict[str, Any] | None, max_positions: int) -> None:
    """ValueError when ``max_positions`` is past ``rope_position_limit``."""
    limit = rope_position_limit(scaling)
    if limit is not None and max_positions > limit:
        raise ValueError(
            f"max_model_len={max_positions} is past what rope_type {scaling['rope_type']!r} runs exactly: "
            f"{limit} positions (original_max_position_embeddings). transformers changes this type's "
            "frequencies with each sequence's length beyond it, which keys already rotated into the paged "
            f"KV cache cannot follow; set max_model_len <= {limit}")


def rotary_dim(cfg: ModelConfig) -> int:
    """How many dims of each head rotate: head_dim x partial_rotary_factor (top level in 4.x files,
    in ``rope_parameters`` in 5.x ones, which wins as in transformers)."""
    params = cfg.hf.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", cfg.hf.get("partial_rotary_factor"))
    return int(cfg.head_dim * (1.0 if factor is None else float(factor)))


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    if arch.startswith("Qwen"):
        if cfg.get("use_sliding_window"):
            raise NotImplementedError("Qwen use_sliding_window=True is not supported")
        return None
    window = cfg.get("sliding_window")
    return int(window) if window else None


def _layer_windows(cfg: dict[str, Any], family: Family, num_layers: int,
                   window: int | None) -> tuple[int | None, ...] | None:
    """Per-layer windows from ``layer_types`` (transformers 5 writes them), else from the pattern the
    architecture implies (every n-th layer global); None where neither says anything. Layer kinds
    other than sliding are left to the family to accept or refuse."""
    kinds = cfg.get("layer_types")
    period = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or family.sliding_pattern
    if not kinds and period:
        kinds = ["sliding_attention" if (i + 1) % int(period) else "full_attention" for i in range(num_layers)]
    if not kinds:
        return None
    if len(kinds) != num_layers:
        raise ValueError(f"config.json lists {len(kinds)} layer_types for {num_layers} layers")
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


# Settings no family implements yet, with the value that means "not used" (each family refuses its own
# further ones at load, ``refuse_settings``): a checkpoint that sets one would load and silently give
# wrong tokens, so it is refused instead. (``quantization_config`` is read, or refused naming what it
# cannot load, by ``model/quant/config.py`` when the worker loads the weights.)
_NO_FAMILY_IMPLEMENTS: dict[str, Any] = {}


def refuse_settings(cfg: dict[str, Any], must_be_off: dict[str, Any]) -> None:
    """NotImplementedError naming the first setting of ``cfg`` that is not its "off" value."""
    for key, off in must_be_off.items():
        value = cfg.get(key, off)
        if value != off and not (off is False and value is None):
            raise NotImplementedError(f"config.json sets {key}={value!r}, which tandem does not implement "
                                      f"(supported: {off!r})")


def model_config_from_dict(cfg: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    arch, family = family_of(cfg.get("architectures") or [])
    refuse_settings(cfg, _NO_FAMILY_IMPLEMENTS)
    heads = int(cfg["num_attention_heads"])
    theta, scaling = rope_of(cfg)
    layers = int(cfg["num_hidden_layers"])
    window = _sliding_window(cfg, arch)
    eos = _as_list((generation or {}).get("eos_token_id")) or _as_list(cfg.get("eos_token_id"))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=window,
        layer_windows=_layer_windows(cfg, family, layers, window),
        eos_token_ids=eos,
        bos_token_id=cfg.get("bos_token_id"),
        hf=cfg,
        **family.implies,
    )


def requested_max_model_len(cfg: ModelConfig, max_model_len: int | None, allow_long: bool) -> int:
    """What the user asked for, checked against the positions the model was trained for."""
    limit = rope_position_limit(cfg.rope_scaling)
    if max_model_len is None:
        return cfg.max_position_embeddings if limit is None else min(limit, cfg.max_position_embeddings)
    check_rope_positions(cfg.rope_scaling, max_model_len)  # allow_long does not lift this one
    if max_model_len > cfg.max_position_embeddings and not allow_long:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}; set allow_long_max_model_len=True "
                         "(--allow-long-max-model-len) to accept it")
    return max_model_len


def load_model_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc})") from None
    gen_file = path / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    try:
        return model_config_from_dict(cfg, generation)
    except KeyError as exc:
        raise ValueError(f"{config_file} lacks required field {exc.args[0]!r}") from None
