"""The device clock behind the server's idle counters: busy time in steps, idle time between steps
only while the engine had work."""
import random

from tandem.contract.worker import StepInterval
from tandem.worker.timing import StepTimes


def test_busy_and_idle_seconds_skip_the_gaps_without_work():
    rng = random.Random(5)
    times, t, busy, idle = StepTimes(window=4), 10.0, 0.0, 0.0
    for step in range(40):
        if step == 20:
            times.pause()  # the engine ran out of work: the next gap is not idling
            t += 100.0
        elif step:
            gap = rng.choice([0.0, rng.uniform(0, 0.002)])
            t += gap
            idle += gap
        length = rng.uniform(0.001, 0.01)
        times.add(StepInterval(step, t, t + length))
        t, busy = t + length, busy + length
    assert abs(times.busy_s - busy) < 1e-9 and abs(times.idle_s - idle) < 1e-9
    # the window (the last 4 steps, all after the pause) counts the gaps between them only
    assert times.idle_fraction() is not None and times.idle_fraction() < 0.5


def test_the_recent_window_skips_the_gap_without_work():
    times = StepTimes(window=8)
    times.add(StepInterval(0, 0.0, 1.0))
    times.add(StepInterval(1, 1.5, 2.5))  # 0.5 s idle with work queued
    times.pause()
    times.add(StepInterval(2, 100.0, 101.0))  # 97.5 s without requests: not idling
    assert abs(times.idle_fraction() - 0.5 / 3.5) < 1e-12


def test_overlapping_intervals_count_no_negative_gap():
    times = StepTimes()
    times.add(StepInterval(0, 0.0, 1.0))
    times.add(StepInterval(1, 0.9, 2.0))  # clock jitter: the next step "starts" before the last ended
    assert times.idle_s == 0.0 and abs(times.busy_s - 2.1) < 1e-12
