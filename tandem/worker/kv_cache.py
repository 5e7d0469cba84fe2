"""How many KV blocks fit, the cache's element type, and the cache tensor itself.

An fp8 cache (``kv_cache_dtype`` fp8 / fp8_e4m3, or fp8_e5m2) holds e4m3 (or e5m2) values x / scale,
one scale per layer for K and one for V (``AttentionSpec.k_scale`` / ``v_scale``): one byte per element, so the same memory
holds twice the tokens of a 16-bit cache (the plan's block count follows the element size)."""
from __future__ import annotations

import logging

import torch

from tandem.model.base import KVSpec

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_TOKENS = 32768
FP8_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The cache's element type for the ``kv_cache_dtype`` option: ``auto`` is the model dtype."""
    if name == "auto":
        return model_dtype
    if name not in FP8_KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported (auto, {', '.join(FP8_KV_DTYPES)})")
    # Triton converts to and from fp8 only from Ada / Hopper (sm_89) on.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype={name!r} needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return FP8_KV_DTYPES[name]


def allocate_kv_cache(spec: KVSpec, num_blocks: int, block_size: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """[layers, 2 (K, V), num_blocks * block_size, kv_heads, head_dim] of ``dtype``, the cache's element
    type (``resolve_kv_dtype``)."""
    if device.type == "cuda":
        # The budget counts memory the caching allocator holds but no tensor uses (an engine shut down
        # earlier in this process) as free; handed back first, so one block of this size can be had.
        torch.cuda.empty_cache()
    return torch.zeros(spec.num_layers, 2, num_blocks * block_size, spec.num_kv_heads, spec.head_dim,
                       device=device, dtype=dtype)


def gpu_kv_budget_bytes(device: torch.device, utilization: float, reserved_bytes: int) -> int:
    """Bytes left for KV under ``utilization`` after what is allocated now (weights), what the
    largest steps will allocate (``reserved_bytes``), and memory held outside torch."""
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    used = torch.cuda.memory_allocated(device)
    return int(total * utilization) - non_torch - used - reserved_bytes


def plan_num_blocks(kv_cache_tokens: int | None, block_size: int, utilization: float, spec: KVSpec,
                    device: torch.device, dtype: torch.dtype, reserved_bytes: int = 0) -> int:
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif device.type == "cuda":
        tokens = gpu_kv_budget_bytes(device, utilization, reserved_bytes) // spec.bytes_per_token(dtype)
    else:
        tokens = CPU_DEFAULT_KV_TOKENS
    num_blocks = tokens // block_size + 1  # +1: block 0 is the reserved padding block
    if num_blocks < 2:
        raise ValueError(f"no room for a KV cache: {tokens} tokens fit (lower the model size or raise "
                         "gpu_memory_utilization)")
    size_gib = num_blocks * block_size * spec.bytes_per_token(dtype) / 2**30
    logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.2f GiB of %s", num_blocks - 1, block_size,
                (num_blocks - 1) * block_size, size_gib, str(dtype).removeprefix("torch."))
    return num_blocks
