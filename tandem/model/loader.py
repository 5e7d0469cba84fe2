"""Load a model: its family (``registry``) reads its weights from a local Hugging Face checkpoint
folder (safetensors, sharded or not) or draws seeded random ones; under tensor parallelism only the
rank's part of each tensor (``TPLayout``)."""
from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tandem.model.base import CausalLM, Getter, MissingWeight, padded
from tandem.model.kv_scales import load_kv_scales
from tandem.model.quant.config import resolve_quantization
from tandem.model.quant.int4_config import Int4Config
from tandem.model.quant.int4_linear import Int4Getter
from tandem.model.quant.reader import QuantizedGetter
from tandem.model.registry import TRANSFORMERS, implementation, model_class
from tandem.model.sources import is_preset, resolve_model_config
from tandem.model.tp_layout import Part, TPLayout
from tandem.model.tp_ops import SingleDevice, TensorParallelOps

logger = logging.getLogger(__name__)

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


class CheckpointReader:
    """Reads named tensors from a checkpoint's safetensors files and remembers which were used, so
    that tensors the forward does not implement (leftovers) are an error rather than ignored.

    Each file is opened once (``close`` ends them): opening one parses its whole header, so opening
    it per tensor made loading quadratic in the tensors per shard: minutes for a mixture of experts
    (Qwen3-30B-A3B's 18K expert tensors; three times as many in a 4-bit checkpoint)."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype, progress: bool = False) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.files = _weight_files(path)
        self.used: set[str] = set()
        self._handles: dict[Path, Any] = {}
        # tensors read so far, on a terminal only (disable=None: tqdm's own TTY check); logs stay clean
        self.bar = tqdm(total=len(self.files), desc=f"loading {path.name}", unit="tensor", leave=False,
                        disable=None if progress else True)

    def get(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        """The tensor, or only its ``part``: a slice reads just those bytes of the file."""
        return padded(self.raw(name, shape, part).to(self.dtype), part)

    def stored_dtype(self, name: str) -> str:
        """The tensor's dtype as the file stores it (safetensors' name: "BF16", "F8_E4M3", ...)."""
        if name not in self.files:
            raise MissingWeight(f"{self.path}: weight {name!r} is missing from the checkpoint")
        f = self._handle(name)
        return self._read(name, lambda: f.get_slice(name).get_dtype())

    def raw(self, name: str, shape: tuple[int, ...] | None, part: Part | None = None) -> torch.Tensor:
        """The tensor (or its ``part``, unpadded) in its stored dtype (FP8 weights, float32 scales);
        ``shape`` None: any shape (scales, whose layout the caller checks)."""
        if name not in self.files:
            raise MissingWeight(f"{self.path}: weight {name!r} is missing from the checkpoint")
        f = self._handle(name)
        found = tuple(self._read(name, lambda: f.get_slice(name).get_shape()))
        if shape is not None and found != shape:
            raise ValueError(f"{self.path}: weight {name!r} has shape {found}, config implies {shape}")
        tensor = self._read(name, lambda: f.get_tensor(name) if part is None else f.get_slice(name)[_index(part)])
        if name not in self.used:
            self.used.add(name)
            self.bar.update(1)
        return tensor.to(self.device)

    def _handle(self, name: str) -> Any:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = _open(file).__enter__()
        return self._handles[file]

    def close(self) -> None:
        """Closes the files (their memory maps) and the progress bar; reading again reopens them."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self.bar.close()

    def _read(self, name: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise ValueError(f"{self.files[name]}: cannot read tensor {name!r} ({exc})") from None

    def check_all_used(self, ignored_suffixes: tuple[str, ...]) -> None:
        """ValueError naming tensors nothing read, apart from those the model says it ignores."""
        left = sorted(n for n in set(self.files) - self.used if not n.endswith(ignored_suffixes))
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise ValueError(f"{self.path}: the checkpoint has tensors the model does not use ({shown}); "
                             "its config describes a different model, or a feature tandem does not implement")


def _index(part: Part) -> tuple[slice, ...]:
    return (slice(None),) * part.dim + (slice(part.start, part.stop),)


def load_model(source: str, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int = 0,
               tp: TPLayout = TPLayout(), comm: SingleDevice | TensorParallelOps | None = None,
               model_impl: str = "auto", quantization: str = "auto") -> CausalLM:
    """The model a name refers to, with weights on ``device``; rotary tables cover ``max_positions``
    positions. Under tensor parallelism (``tp.size > 1``, with ``comm`` the group's collectives) only
    rank ``tp.rank``'s shards. ``model_impl``: which implementation runs it (``registry.implementation``);
    ``quantization``: how its linear weights are stored (``quant.config.resolve_quantization``)."""
    config = resolve_model_config(source)
    tp.check(config)
    qc = resolve_quantization(config.hf, quantization)
    if qc is not None and implementation(config.architecture, model_impl) == TRANSFORMERS:
        raise NotImplementedError(f"quantization_config / quantization={quantization!r} ({qc.describe()}): "
                                  f"quantized weights load only into tandem's native families, not the "
                                  f"transformers backend that runs {config.architecture}")
    family = model_class(config.architecture, model_impl)
    comm = comm or SingleDevice()
    if is_preset(source):
        get = random_getter(device, dtype, seed)
        quantized = Int4Getter if isinstance(qc, Int4Config) else QuantizedGetter  # 4-bit or FP8 weights
        return family.load(config, get if qc is None else quantized(get, qc, device, dtype), tp, max_positions, comm)
    reader = CheckpointReader(Path(source), device, dtype, progress=tp.rank == 0)
    logger.info("reading %d tensors from %d safetensors file(s) in %s", len(reader.files),
                len(set(reader.files.values())), source)
    quantized = Int4Getter if isinstance(qc, Int4Config) else QuantizedGetter  # 4-bit or FP8 weights
    get = reader.get if qc is None else quantized(reader.get, qc, device, dtype,
                                                  None if qc.source == "online" else reader)
    try:
        model = family.load(config, get, tp, max_positions, comm)
        load_kv_scales(model, reader, None if qc is None else qc.kv_cache_scheme)  # FP8 KV cache scales, if any
    finally:
        reader.close()
    reader.check_all_used(family.ignored_tensors(config))
    shard = f", tensor-parallel shard {tp.rank + 1}/{tp.size}" if tp.size > 1 else ""
    logger.info("loaded %s (%s, %.2fB params%s) to %s as %s%s", source, config.architecture,
                config.num_params() / 1e9, shard, device, dtype, "" if qc is None else f", {qc.describe()}")
    return model


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
        return padded(out.narrow(part.dim, part.start, part.stop - part.start).clone(), part)

    return get
