"""Build model weights from a local Hugging Face checkpoint folder (safetensors, sharded or not), or
seeded random weights; under tensor parallelism only the rank's part of each tensor (``TPLayout``)."""
from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tandem.model.llama import LayerWeights, ModelWeights
from tandem.model.model_config import ModelConfig
from tandem.model.tp_layout import Part, TPLayout

logger = logging.getLogger(__name__)

#: (name, full shape, the part to read or None for all of it) -> tensor on the device
Getter = Callable[[str, tuple[int, ...], "Part | None"], torch.Tensor]


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

    def get(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        """The tensor, or only its ``part``: a slice reads just those bytes of the file."""
        if name not in self.files:
            raise ValueError(f"{self.path}: weight {name!r} is missing from the checkpoint")
        with _open(self.files[name]) as f:
            found = tuple(self._read(name, lambda: f.get_slice(name).get_shape()))
            if found != shape:
                raise ValueError(f"{self.path}: weight {name!r} has shape {found}, config implies {shape}")
            tensor = self._read(name, lambda: f.get_tensor(name) if part is None else f.get_slice(name)[_index(part)])
        self.used.add(name)
        return _padded(tensor.to(device=self.device, dtype=self.dtype), part)

    def _read(self, name: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise ValueError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from None

    def check_all_used(self, tied_embeddings: bool) -> None:
        left = sorted(n for n in set(self.files) - self.used
                      if not n.endswith(_IGNORABLE_SUFFIXES) and not (tied_embeddings and n == "lm_head.weight"))
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise ValueError(f"{self.path}: the checkpoint has tensors the model does not use ({shown}); "
                             "its config describes a different model, or a feature tandem does not implement")


def _index(part: Part) -> tuple[slice, ...]:
    return (slice(None),) * part.dim + (slice(part.start, part.stop),)


def _padded(tensor: torch.Tensor, part: Part | None) -> torch.Tensor:
    """Zeros after a part that ends before its size (the last vocabulary shard)."""
    missing = 0 if part is None else part.size - tensor.shape[part.dim]
    if not missing:
        return tensor
    pad = list(tensor.shape)
    pad[part.dim] = missing
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=part.dim)


def _layer(cfg: ModelConfig, get: Getter, i: int, tp: TPLayout) -> LayerWeights:
    p = f"model.layers.{i}."
    h, q, kv, inter, d = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.head_dim
    q_part, kv_part, mlp_part = tp.q_part(cfg), tp.kv_part(cfg), tp.mlp_part(cfg)
    qkv = [(f"{p}self_attn.{n}_proj", size, part) for n, size, part in (("q", q, q_part), ("k", kv, kv_part),
                                                                          ("v", kv, kv_part))]
    return LayerWeights(
        input_norm=get(f"{p}input_layernorm.weight", (h,), None),
        qkv=torch.cat([get(f"{name}.weight", (size, h), part) for name, size, part in qkv]),
        o=get(f"{p}self_attn.o_proj.weight", (h, q), tp.q_part(cfg, dim=1)),
        post_norm=get(f"{p}post_attention_layernorm.weight", (h,), None),
        gate_up=torch.cat([get(f"{p}mlp.gate_proj.weight", (inter, h), mlp_part),
                           get(f"{p}mlp.up_proj.weight", (inter, h), mlp_part)]),
        down=get(f"{p}mlp.down_proj.weight", (h, inter), tp.mlp_part(cfg, dim=1)),
        qkv_bias=torch.cat([get(f"{name}.bias", (size,), part) for name, size, part in qkv]) if cfg.qkv_bias else None,
        q_norm=get(f"{p}self_attn.q_norm.weight", (d,), None) if cfg.qk_norm else None,
        k_norm=get(f"{p}self_attn.k_norm.weight", (d,), None) if cfg.qk_norm else None,
    )


def assemble_weights(cfg: ModelConfig, get: Getter, tp: TPLayout = TPLayout()) -> ModelWeights:
    """``cfg`` is the whole model's config; the weights are rank ``tp.rank``'s parts of it."""
    vocab = (cfg.vocab_size, cfg.hidden_size)
    embed = get("model.embed_tokens.weight", vocab, tp.vocab_part(cfg))
    layers = [_layer(cfg, get, i, tp) for i in range(cfg.num_layers)]
    norm = get("model.norm.weight", (cfg.hidden_size,), None)
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight", vocab, tp.vocab_part(cfg))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def load_checkpoint_weights(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                            tp: TPLayout = TPLayout()) -> ModelWeights:
    reader = CheckpointReader(path, device, dtype)
    weights = assemble_weights(cfg, reader.get, tp)
    reader.check_all_used(cfg.tie_word_embeddings)
    shard = f", tensor-parallel shard {tp.rank + 1}/{tp.size}" if tp.size > 1 else ""
    logger.info("loaded %s (%s, %.2fB params%s) to %s as %s", path, cfg.architecture, cfg.num_params() / 1e9, shard,
                device, dtype)
    return weights


def _tensor_seed(seed: int, name: str) -> int:
    """Each tensor has its own stream, so a rank can draw one tensor without drawing those before it."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def random_getter(device: torch.device, dtype: torch.dtype, seed: int, std: float = 0.02) -> Getter:
    """Seeded random weights with the real shapes; norms are ~1 so activations stay tame. A part is cut
    from the whole tensor drawn on the device (one tensor at a time), so the shards of N ranks are
    exactly the single-device weights, split."""
    gen = torch.Generator(device=device)

    def get(name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        gen.manual_seed(_tensor_seed(seed, name))
        out = torch.empty(shape, device=device, dtype=dtype)
        out = out.normal_(1.0, 0.1, generator=gen) if "norm" in name else out.normal_(0.0, std, generator=gen)
        if part is None:
            return out
        return _padded(out.narrow(part.dim, part.start, part.stop - part.start).clone(), part)

    return get
