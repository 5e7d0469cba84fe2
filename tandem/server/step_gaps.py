"""``TANDEM_STEP_LOG=PATH``: where a served run's device idle time goes.

The engine core then records every step (the host's phases, as ``tandem bench`` does, and the
device's interval) and, when the server shuts down, writes JSON to PATH: the device's busy and idle
seconds while the core had work, all of its idle time by gap size and by the kind of step after each
gap (``bench.metrics.idle_breakdown``), and the longest gaps with what the host did around each
(``bench.metrics.largest_gaps``). Gaps across a stretch where the core had no request at all
are left out: the device waiting for traffic is not the loop's cost. The record grows with every
step: for diagnosing a benchmark run, not for a long-running server. Under data parallelism each
engine core writes its own file (``from_env``)."""
from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path

from tandem.bench.metrics import idle_breakdown, largest_gaps
from tandem.bench.step_log import StepLog
from tandem.contract.worker import StepInterval
from tandem.engine.core import EngineCore
from tandem.engine.kv_events import DP_RANK_ENV

NUM_GAPS = 10


class StepGapLog:
    def __init__(self, core: EngineCore, path: Path) -> None:
        self.core, self.path = core, path
        self.log = StepLog()
        self.idle_marks: list[float] = []  # when the core found itself without work
        core.observers.append(self.log)
        core.worker.start_timing()

    @staticmethod
    def from_env(core: EngineCore) -> StepGapLog | None:
        """From ``TANDEM_STEP_LOG``; under data parallelism core r writes PATH's name with ``.rank<r>``
        before its suffix."""
        path = os.environ.get("TANDEM_STEP_LOG")
        if not path:
            return None
        target, rank = Path(path), os.environ.get(DP_RANK_ENV)
        if rank is not None:
            target = target.with_name(f"{target.stem}.rank{rank}{target.suffix}")
        return StepGapLog(core, target)

    def core_idle(self) -> None:
        self.idle_marks.append(time.perf_counter())

    def write(self) -> None:
        """The summary (call once, after the last step was collected)."""
        segments = self._working_segments(sorted(self.core.worker.stop_timing(), key=lambda i: i.start))
        busy = sum(i.end - i.start for seg in segments for i in seg)
        idle = sum(max(0.0, b.start - a.end) for seg in segments for a, b in zip(seg, seg[1:]))
        gaps = [g for seg in segments for g in largest_gaps(seg, self.log.by_id, NUM_GAPS)]
        summary = {"steps": sum(len(seg) for seg in segments), "busy_s": busy, "idle_s": idle,
                   "idle_fraction": idle / (busy + idle) if busy + idle > 0 else None,
                   "largest_gaps": sorted(gaps, key=lambda g: -g["gap_ms"])[:NUM_GAPS],
                   "idle_breakdown": idle_breakdown(segments, self.log.by_id)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=1))

    def _working_segments(self, spans: list[StepInterval]) -> list[list[StepInterval]]:
        """``spans`` cut wherever the core was without work between two steps."""
        segments: list[list[StepInterval]] = []
        for span in spans:
            if segments and not self._idle_between(segments[-1][-1].end, span.start):
                segments[-1].append(span)
            else:
                segments.append([span])
        return segments

    def _idle_between(self, start: float, end: float) -> bool:
        k = bisect.bisect_right(self.idle_marks, start)
        return k < len(self.idle_marks) and self.idle_marks[k] < end
