"""Per-step measurements for benchmarks: host phase durations and what each step computed.

A ``StepObserver`` the benchmark attaches to the engine core; device times come from the worker's
step timing, matched by step id."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.observer import ProcessTimes, SubmitTimes
from tandem.engine.scheduler import SchedulerOutput


@dataclass
class StepRecord:
    step_id: int
    num_tokens: int
    num_seqs: int
    num_decode: int  # sequences adding exactly one token with nothing left to prefill
    num_sampled: int  # sequences whose last token is sampled this step (rows of the LM head)
    kv_tokens: int  # context tokens attention reads, summed over sequences
    attn_pairs: int  # (query, key) pairs attention scores, summed over sequences
    t_begin: float  # host clock when planning started
    schedule_s: float
    build_s: float
    submit_s: float
    t_collect: float = 0.0  # host clock when it started waiting for this step's result
    wait_s: float = 0.0  # host blocked on the device's result
    process_s: float = 0.0
    #: this thread's wall and CPU time and involuntary context switches from the previous step's
    #: processed callback to this one's submitted callback (the host's planning of this step): CPU
    #: time well under the wall time, or switches, mean the OS took the CPU away; CPU time equal to a
    #: long wall time with no switches or faults means the CPU itself ran slowly
    plan_cpu_s: float = 0.0
    plan_wall_s: float = 0.0
    plan_preempted: int = 0
    plan_page_faults: int = 0  # minor page faults in that interval (kernel time counted as CPU time)
    #: per sliding window of the model's layers: (kv_tokens, attn_pairs) when each query sees at most
    #: that many keys (the window's own tokens included)
    windowed: dict[int, tuple[int, int]] = field(default_factory=dict)


def _thread_clock() -> tuple[float, float, int, int]:
    """(wall, this thread's CPU seconds, its involuntary context switches and minor faults so far)."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return time.perf_counter(), time.thread_time(), usage.ru_nivcsw, usage.ru_minflt


def _windowed_pairs(start: int, n: int, window: int) -> int:
    """sum over p in [start, start + n) of min(p + 1, window): the scores of a chunk's queries."""
    below = max(0, min(start + n, window - 1) - start)  # queries that see fewer than window keys
    return below * (2 * start + below + 1) // 2 + (n - below) * window


def windowed_reads(sched: SchedulerOutput, window: int) -> tuple[int, int]:
    """(kv_tokens, attn_pairs) of a step under a sliding window."""
    kv = sum(min(item.start + item.num_tokens, item.num_tokens + window - 1) for item in sched.chunks)
    pairs = sum(_windowed_pairs(item.start, item.num_tokens, window) for item in sched.chunks)
    if sched.decode is not None:
        seen = int(np.minimum(sched.decode.starts + 1, window).sum())
        kv, pairs = kv + seen, pairs + seen
    return kv, pairs


@dataclass
class StepLog:
    windows: tuple[int, ...] = ()  # the model's distinct sliding windows (the floor model counts their reads)
    records: list[StepRecord] = field(default_factory=list)
    by_id: dict[int, StepRecord] = field(default_factory=dict)
    _last: tuple[float, float, int, int] | None = None  # the thread clock at the last processed callback

    def step_submitted(self, sched: SchedulerOutput, t: SubmitTimes) -> None:
        chunks, d = sched.chunks, sched.decode
        decode = sum(1 for item in chunks if item.num_tokens == 1 and item.start >= item.seq.prompt_len)
        sampled = sum(1 for item in chunks if item.sample)
        kv = sum(item.start + item.num_tokens for item in chunks)
        pairs = sum(item.num_tokens * (item.start + item.num_tokens) for item in chunks)
        if d is not None:  # one token each: as arrays, the step loop's own cost stays O(changes)
            decode += int((d.starts >= d.state.prompt_len[d.rows]).sum())
            sampled += len(d)
            kv += int(d.starts.sum()) + len(d)
            pairs += int(d.starts.sum()) + len(d)
        rec = StepRecord(sched.step_id, sched.num_tokens, len(sched), decode, sampled, kv, pairs, t.begin,
                         t.scheduled - t.begin, t.built - t.scheduled, t.submitted - t.built,
                         windowed={w: windowed_reads(sched, w) for w in self.windows})
        now = _thread_clock()
        if self._last is not None:
            rec.plan_wall_s, rec.plan_cpu_s = now[0] - self._last[0], now[1] - self._last[1]
            rec.plan_preempted, rec.plan_page_faults = now[2] - self._last[2], now[3] - self._last[3]
        self.records.append(rec)
        self.by_id[rec.step_id] = rec

    def step_processed(self, step_id: int, t: ProcessTimes) -> None:
        rec = self.by_id[step_id]
        rec.t_collect, rec.wait_s, rec.process_s = t.collect, t.collected - t.collect, t.processed - t.collected
        self._last = _thread_clock()
