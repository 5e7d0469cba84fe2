"""Triton kernels. Imported lazily: Triton is needed only on CUDA (and for interpreter tests)."""
from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
