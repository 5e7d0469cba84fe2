"""How many KV blocks fit, and the cache tensor itself."""
from __future__ import annotations

import logging

import torch

from tandem.config import EngineConfig
from tandem.model.model_config import ModelConfig

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_TOKENS = 32768


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """[layers, 2 (K, V), num_blocks * block_size, kv_heads, head_dim]."""
    return torch.zeros(cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim,
                       device=device, dtype=dtype)


def gpu_kv_budget_bytes(engine: EngineConfig, peak_activation_bytes: int) -> int:
    """Bytes left for KV under ``gpu_memory_utilization`` after weights, activations and non-torch use."""
    free, total = torch.cuda.mem_get_info(engine.device)
    non_torch = total - free - torch.cuda.memory_reserved(engine.device)
    used = torch.cuda.memory_allocated(engine.device)
    return int(total * engine.gpu_memory_utilization) - non_torch - max(used, peak_activation_bytes)


def plan_num_blocks(engine: EngineConfig, cfg: ModelConfig, peak_activation_bytes: int = 0) -> int:
    if engine.kv_cache_tokens is not None:
        tokens = engine.kv_cache_tokens
    elif engine.device.type == "cuda":
        tokens = gpu_kv_budget_bytes(engine, peak_activation_bytes) // kv_bytes_per_token(cfg, engine.dtype)
    else:
        tokens = CPU_DEFAULT_KV_TOKENS
    num_blocks = tokens // engine.block_size + 1  # +1: block 0 is the reserved padding block
    if num_blocks < 2:
        raise ValueError(f"no room for a KV cache: {tokens} tokens fit (lower the model size or raise "
                         "gpu_memory_utilization)")
    size_gib = num_blocks * engine.block_size * kv_bytes_per_token(cfg, engine.dtype) / 2**30
    logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB", num_blocks - 1, engine.block_size,
                (num_blocks - 1) * engine.block_size, size_gib)
    return num_blocks
