"""The end of a split-K GEMM: the splits' float32 partial sums [S, M, N] added in split order, the
bias added, and the result rounded once to the output dtype. The fixed order makes the result
independent of timing, which atomic adds of the partials would not.

``finish_tile`` does it inside the GEMM itself: each program stores its split's partial tile, takes
a ticket from the tile's counter, and the program that finishes the tile last sums every split's
partial in split order and writes the output (then resets the counter for the next launch). At
decode sizes in a CUDA graph a separate reduction kernel cost a launch of ~3-4 us per linear
layer, about what a small layer's weights take to read. The counters (``tile_counters``)
are one zeroed buffer per device, shared by the launches, which run one at a time on the compute
stream."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_out(acc, out_ptr, bias_ptr, offs, col_idx, ok, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col_idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def finish_tile(acc, out_ptr, parts_ptr, bias_ptr, counters_ptr, offs, col_idx, ok, split, splits, stride_split,
                HAS_BIAS: tl.constexpr):
    """The output tile at ``offs`` (element offsets into [M, N] row-major ``out_ptr``; ``col_idx``
    their columns, for the bias; ``ok`` the mask; any shape, the caller's) from split ``split`` of
    ``splits``' float32 partial ``acc`` of that shape. ``parts_ptr``: the [splits, M, N] float32
    workspace (``stride_split`` = M * N; unused with one split); ``counters_ptr``: ``tile_counters``,
    indexed by the program's (axis 0, axis 1) position. The caller's shapes and layouts are kept:
    a 2-D epilogue would make the compiler re-lay out a one-row kernel's main loop."""
    if splits == 1:
        _store_out(acc, out_ptr, bias_ptr, offs, col_idx, ok, HAS_BIAS)
    else:
        tl.store(parts_ptr + split * stride_split + offs, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is stored before the ticket is taken (release)
        counter = counters_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1:
            total = tl.zeros_like(acc)
            for s in range(0, splits):  # in split order, past the L1 (other programs wrote them)
                total += tl.load(parts_ptr + s * stride_split + offs, mask=ok, other=0.0, cache_modifier=".cg")
            _store_out(total, out_ptr, bias_ptr, offs, col_idx, ok, HAS_BIAS)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_TILES = 1 << 16  # output tiles of one split-K launch


def tile_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed int32 ticket counters for ``finish_tile`` (made once; each launch leaves
    them zero)."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device]
