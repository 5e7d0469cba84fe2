"""Build model weights from a local Hugging Face checkpoint folder (safetensors, sharded or not)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.model.llama import LayerWeights, ModelWeights
from tandem.model.model_config import ModelConfig

logger = logging.getLogger(__name__)

Getter = Callable[[str, tuple[int, ...]], torch.Tensor]


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> file, from the shard index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a valid shard index ({exc!r})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{path}: shards listed in {index.name} are missing: {missing}")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (only safetensors checkpoints load)")
    names: dict[str, Path] = {}
    for file in files:
        with _open(file) as f:
            names.update({name: file for name in f.keys()})
    return names


# Tensors a checkpoint may carry that the forward rightly ignores: rotary tables some exporters save,
# and an lm_head that tied embeddings replace.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointReader:
    """Reads named tensors from a checkpoint's safetensors files and remembers which were used, so
    that tensors the forward does not implement (leftovers) are an error rather than ignored."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.files = _weight_files(path)
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"{self.path}: weight {name!r} is missing from the checkpoint")
        with _open(self.files[name]) as f:
            try:
                tensor = f.get_tensor(name)
            except Exception as exc:
                raise ValueError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from None
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: weight {name!r} has shape {tuple(tensor.shape)}, config implies {shape}")
        self.used.add(name)
        return tensor.to(device=self.device, dtype=self.dtype)

    def check_all_used(self, tied_embeddings: bool) -> None:
        left = sorted(n for n in set(self.files) - self.used
                      if not n.endswith(_IGNORABLE_SUFFIXES) and not (tied_embeddings and n == "lm_head.weight"))
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise ValueError(f"{self.path}: the checkpoint has tensors the model does not use ({shown}); "
                             "its config describes a different model, or a feature tandem does not implement")


def _layer(cfg: ModelConfig, get: Getter, i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    h, q, kv, inter, d = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.head_dim
    qkv_names = [(f"{p}self_attn.{n}_proj", size) for n, size in (("q", q), ("k", kv), ("v", kv))]
    return LayerWeights(
        input_norm=get(f"{p}input_layernorm.weight", (h,)),
        qkv=torch.cat([get(f"{name}.weight", (size, h)) for name, size in qkv_names]),
        o=get(f"{p}self_attn.o_proj.weight", (h, q)),
        post_norm=get(f"{p}post_attention_layernorm.weight", (h,)),
        gate_up=torch.cat([get(f"{p}mlp.gate_proj.weight", (inter, h)), get(f"{p}mlp.up_proj.weight", (inter, h))]),
        down=get(f"{p}mlp.down_proj.weight", (h, inter)),
        qkv_bias=torch.cat([get(f"{name}.bias", (size,)) for name, size in qkv_names]) if cfg.qkv_bias else None,
        q_norm=get(f"{p}self_attn.q_norm.weight", (d,)) if cfg.qk_norm else None,
        k_norm=get(f"{p}self_attn.k_norm.weight", (d,)) if cfg.qk_norm else None,
    )


def assemble_weights(cfg: ModelConfig, get: Getter) -> ModelWeights:
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    layers = [_layer(cfg, get, i) for i in range(cfg.num_layers)]
    norm = get("model.norm.weight", (cfg.hidden_size,))
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def load_checkpoint_weights(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ModelWeights:
    reader = CheckpointReader(path, device, dtype)
    weights = assemble_weights(cfg, reader.get)
    reader.check_all_used(cfg.tie_word_embeddings)
    logger.info("loaded %s (%s, %.2fB params) to %s as %s", path, cfg.architecture, cfg.num_params() / 1e9,
                device, dtype)
    return weights


def random_getter(device: torch.device, dtype: torch.dtype, seed: int, std: float = 0.02) -> Getter:
    """Seeded random weights with the real shapes; norms are ~1 so activations stay tame."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, device=device, dtype=dtype)
        if "norm" in name:
            return out.normal_(1.0, 0.1, generator=gen)
        return out.normal_(0.0, std, generator=gen)

    return get
