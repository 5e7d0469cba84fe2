"""A simulated GPU: the real host loop against a device whose steps take a measured GPU's time.

It answers like ``FakeWorker`` (well-formed tokens, logprobs, grammar-allowed tokens), but each
step occupies the device for ``StepTimeModel.step_s`` seconds: a step submitted at host time t
runs from max(t, the previous step's end) for that long, as a GPU's stream would run it. Nothing
computes meanwhile: the device is a clock, and the host sleeps (``collect`` until the step's end;
in sync mode ``submit`` until then), so the simulation takes no core from the host thread and its
figures hold on a loaded machine. The device lane it records is exact by construction; what the
host does between steps is the real engine's work on this CPU."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from tandem.bench.fake_worker import FakeWorker
from tandem.bench.metrics import idle_fraction
from tandem.bench.step_time import StepTimeModel
from tandem.config import EngineConfig
from tandem.contract.step import StepInputs, StepOutput
from tandem.contract.worker import StepInterval

_SAMPLE_S = 50e-6  # a step waiting for its grammar mask samples this long after the mask arrives


@dataclass
class _Launched:
    output: StepOutput
    interval: StepInterval


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


class SimulatedDevice(FakeWorker):
    def __init__(self, config: EngineConfig, clock: StepTimeModel, kv_tokens: int | None = None) -> None:
        super().__init__(config, kv_tokens)
        self.clock = clock
        self.info = replace(self.info, device="simulated", device_name=f"simulated {clock.device}")
        self._async = True
        self._free_at = 0.0  # when the newest launched step ends
        self._newest: _Launched | None = None
        self._timing: list[StepInterval] | None = None
        self._recent: deque[StepInterval] = deque(maxlen=64)
        self._busy = self._idle = 0.0
        self._paused = True  # the first step's wait is not idle time

    def submit(self, step: StepInputs) -> _Launched:
        output = super().submit(step)
        now = time.perf_counter()
        start = max(now, self._free_at)
        if not self._paused:
            self._idle += start - self._free_at
        self._paused = False
        launched = _Launched(output, StepInterval(step.step_id, start, start + self.clock.step_s(step)))
        self._launch(launched)
        if not self._async:  # the host waits for the step before it does anything else
            _sleep_until(self._free_at)
        return launched

    def _launch(self, launched: _Launched) -> None:
        self._newest = launched
        self._free_at = launched.interval.end

    def provide_mask(self, step_id: int, mask: np.ndarray) -> None:
        super().provide_mask(step_id, mask)
        launched = self._newest
        if launched is not None and launched.interval.step_id == step_id:  # only its sampling waited
            i = launched.interval
            launched.interval = StepInterval(i.step_id, i.start, max(i.end, time.perf_counter() + _SAMPLE_S))
            self._free_at = launched.interval.end

    def collect(self, handle: _Launched) -> StepOutput:
        _sleep_until(handle.interval.end)
        i = handle.interval
        self._busy += i.end - i.start
        self._recent.append(i)
        if self._timing is not None:
            self._timing.append(i)
        return handle.output

    def set_async(self, enabled: bool) -> None:
        self._async = enabled

    def drain(self) -> None:
        _sleep_until(self._free_at)

    def start_timing(self) -> None:
        self._timing = []

    def stop_timing(self) -> list[StepInterval]:
        timing, self._timing = self._timing or [], None
        return timing

    def idle_fraction(self) -> float | None:
        return idle_fraction(list(self._recent))

    def device_seconds(self) -> tuple[float, float]:
        return self._busy, self._idle

    def pause_device_clock(self) -> None:
        self._paused = True
