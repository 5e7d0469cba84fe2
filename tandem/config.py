"""Engine-level settings: what the user chooses, validated once at start-up."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "half": torch.float16, "float": torch.float32, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" picks bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EngineConfig:
    model: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_tokens: int | None = None
    seed: int = 0
    async_batching: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("block_size", self.block_size >= 1, "must be >= 1"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0, "must be in (0, 1]"),
            ("kv_cache_tokens", self.kv_cache_tokens is None or self.kv_cache_tokens >= self.block_size,
             "must be >= block_size"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def use_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda"
