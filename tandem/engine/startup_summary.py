"""The start-up line logged at INFO: what the engine decided (device, dtype, context, KV cache, graphs)
and how long start-up took. Reads ``WorkerInfo`` in-process and the core's ``Ready`` in the server
(same field names; ``Ready`` carries no graph sizes)."""
from __future__ import annotations

from typing import Any


def startup_summary(info: Any, seconds: float) -> str:
    blocks = info.num_kv_blocks - 1  # block 0 is reserved
    kv_dtype = getattr(info, "kv_cache_dtype", "") or info.dtype
    parts = [f"engine ready in {seconds:.1f} s on {info.device} ({info.device_name})", f"dtype {info.dtype}",
             f"max_model_len {info.max_model_len}",
             f"KV cache {blocks} blocks x {info.block_size} = {blocks * info.block_size} tokens ({kv_dtype})"]
    sizes = getattr(info, "graph_batch_sizes", None)
    if sizes is not None:
        parts.append(f"decode graphs for batch sizes {_ranges(sizes)}" if sizes else "no CUDA graphs (eager)")
    buckets = getattr(info, "graph_token_buckets", ())
    if buckets:
        parts.append(f"piecewise graphs up to {max(buckets)} tokens")
    return "; ".join(parts)


def _ranges(sizes: tuple[int, ...]) -> str:
    ordered = sorted(sizes)
    return ", ".join(map(str, ordered)) if len(ordered) <= 6 else f"{ordered[0]}..{ordered[-1]} ({len(ordered)} sizes)"
