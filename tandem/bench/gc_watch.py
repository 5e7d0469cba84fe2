"""How long Python's garbage collector paused the host during a run: its pauses are host time the
pipeline must hide, and long ones show up as GPU gaps."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field


@dataclass
class GcPauses:
    pauses: list[tuple[int, float]] = field(default_factory=list)  # (generation, seconds)
    _start: float = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        total = sum(s for _, s in self.pauses)
        return {"collections": len(self.pauses), "gen2_collections": sum(g == 2 for g, _ in self.pauses),
                "total_ms": total * 1e3, "max_ms": max((s for _, s in self.pauses), default=0.0) * 1e3}
