"""A simulated GPU: the real host loop against a device whose steps take a measured GPU's time.

It answers like ``FakeWorker`` (well-formed tokens, logprobs, grammar-allowed tokens), but each
step occupies the device for ``StepTimeModel.step_s`` seconds of a virtual clock: a step
submitted at time t runs from max(t, the previous step's end), as a GPU's stream would run it.

The clock (``now``) is the host thread's CPU time plus every wait: the host's work counts as long
as it computes, not as long as the machine's other processes keep it from a core, and a wait for
the device (``collect``, and ``submit`` in sync mode) moves the clock to the step's end at once.
Nothing sleeps and nothing spins, so the simulation takes no core and its figures hold on a busy
machine; a run takes about the host's CPU time, not the GPU's."""
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


class SimulatedDevice(FakeWorker):
    def __init__(self, config: EngineConfig, clock: StepTimeModel, kv_tokens: int | None = None) -> None:
        super().__init__(config, kv_tokens)
        self.clock = clock
        self.info = replace(self.info, device="simulated", device_name=f"simulated {clock.device}")
        self._async = True
        self._waited = 0.0  # virtual seconds the host spent waiting (its CPU time is the rest)
        self._free_at = 0.0  # when the newest launched step ends
        self._newest: _Launched | None = None
        self._timing: list[StepInterval] | None = None
        self._recent: deque[StepInterval] = deque(maxlen=64)
        self._busy = self._idle = 0.0
        self._paused = True  # the first step's wait is not idle time

    def now(self) -> float:
        """The virtual clock, in seconds; read only from the engine's thread."""
        return time.thread_time() + self._waited

    def wait(self, seconds: float) -> None:
        """The host idles (no request has arrived yet): the clock moves on."""
        self._waited += max(0.0, seconds)

    def _wait_until(self, t: float) -> None:
        self.wait(t - self.now())

    def submit(self, step: StepInputs) -> _Launched:
        output = super().submit(step)
        start = max(self.now(), self._free_at)
        if not self._paused:
            self._idle += start - self._free_at
        self._paused = False
        launched = _Launched(output, StepInterval(step.step_id, start, start + self.clock.step_s(step)))
        self._newest, self._free_at = launched, launched.interval.end
        if not self._async:  # the host waits for the step before it does anything else
            self._wait_until(self._free_at)
        return launched

    def provide_mask(self, step_id: int, mask: np.ndarray) -> None:
        began = time.thread_time()
        super().provide_mask(step_id, mask)
        self._waited -= time.thread_time() - began  # picking the tokens is the device's work, not the host's
        launched = self._newest
        if launched is not None and launched.interval.step_id == step_id:  # only its sampling waited
            i = launched.interval
            launched.interval = StepInterval(i.step_id, i.start, max(i.end, self.now() + _SAMPLE_S))
            self._free_at = launched.interval.end

    def collect(self, handle: _Launched) -> StepOutput:
        self._wait_until(handle.interval.end)
        i = handle.interval
        self._busy += i.end - i.start
        self._recent.append(i)
        if self._timing is not None:
            self._timing.append(i)
        return handle.output

    def set_async(self, enabled: bool) -> None:
        self._async = enabled

    def drain(self) -> None:
        self._wait_until(self._free_at)

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
