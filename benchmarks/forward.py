"""What a ``scripts/NAME.py`` wrapper does: run ``benchmarks/NAME.py`` as the program, or, when the
wrapper is imported (``import gpu_checks`` with ``scripts/`` on the path, as some tools do), stand
for that module."""
from __future__ import annotations

import importlib
import runpy
import sys
from typing import Any


def forward(wrapper: dict[str, Any], name: str) -> None:
    """``wrapper``: the wrapper's globals(); ``name``: the module under ``benchmarks/``."""
    full = f"benchmarks.{name}"
    if wrapper["__name__"] == "__main__":
        runpy.run_module(full, run_name="__main__", alter_sys=True)
        return
    real = importlib.import_module(full)
    wrapper.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
    if sys.modules.get(wrapper["__name__"]) is not None:  # later imports get the module itself
        sys.modules[wrapper["__name__"]] = real
