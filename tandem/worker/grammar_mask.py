"""Structured output on the device: a step's grammar bitmask applied to its logits.

The host fills one int32 row per constrained sampled row (xgrammar's layout: bit ``t % 32`` of word
``t // 32`` is set where token ``t`` is allowed) and hands it over after the step was submitted
(``Worker.provide_mask``). Just before sampling (after penalties and logit bias, before temperature,
top-k, top-p and min-p) every other token's logit becomes -inf, so the sampler draws from the
constrained distribution and the logprobs describe it.

On CUDA one Triton launch does it (``tandem.kernels.grammar_mask``: it writes only the banned
logits). Elsewhere plain torch: no host synchronisation, any logits dtype (float64 in the exact
tests); rows go in chunks so the temporaries stay a few tens of MB whatever the batch.

Grammar worker processes write their rows into shared memory (``engine.structured.shared_mask``),
which ``pin_host_memory`` registers as page-locked, so the executor's copy reads them in place."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from tandem.worker.sampler import use_kernels

log = logging.getLogger(__name__)
_CHUNK_ELEMENTS = 1 << 22  # vocabulary entries unpacked at once
_BITS: dict[torch.device, torch.Tensor] = {}  # per device: byte value -> its 8 bits, least significant first


def _bit_table(device: torch.device) -> torch.Tensor:
    table = _BITS.get(device)
    if table is None:
        values = torch.arange(256, dtype=torch.int32)
        table = _BITS[device] = ((values[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(device)
    return table


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [rows, words] -> bool [rows, vocab]: which tokens each row allows."""
    rows = bitmask.shape[0]
    as_bytes = bitmask.contiguous().view(torch.uint8).int()  # little-endian: byte k of a word holds bits 8k..8k+7
    return _bit_table(bitmask.device)[as_bytes].view(rows, -1)[:, :vocab]


def apply_grammar_mask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``logits[rows[i], t] = -inf`` for every token ``t`` that ``bitmask[i]`` does not allow."""
    if use_kernels(logits) and logits.stride(1) == 1:
        from tandem.kernels.grammar_mask import fused_grammar_mask

        fused_grammar_mask(logits, rows, bitmask)
        return
    n, vocab = bitmask.shape[0], logits.shape[1]
    per_chunk = max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, n, per_chunk):
        part = slice(start, start + per_chunk)
        allowed = allowed_tokens(bitmask[part], vocab)
        chosen = rows[part]
        logits.index_copy_(0, chosen, logits.index_select(0, chosen).masked_fill_(~allowed, float("-inf")))


def pin_host_memory(array: np.ndarray) -> Callable[[], None] | None:
    """Register ``array``'s memory with CUDA as page-locked; returns the call that unregisters it, or
    None if CUDA refused (the executor then copies the mask into its own pinned rows)."""
    address, size = array.ctypes.data, array.nbytes
    status = torch.cuda.cudart().cudaHostRegister(address, size, 0)
    if int(status) != 0:
        log.warning("grammar masks: cudaHostRegister of %d bytes failed (%s); the rows are copied instead",
                    size, status)
        return None
    return lambda: torch.cuda.cudart().cudaHostUnregister(address)
