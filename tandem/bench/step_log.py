"""Per-step measurements for benchmarks: host phase durations and what each step computed.

A ``StepObserver`` the benchmark attaches to the engine core; device times come from the worker's
step timing, matched by step id."""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class StepLog:
    records: list[StepRecord] = field(default_factory=list)
    by_id: dict[int, StepRecord] = field(default_factory=dict)

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
                         t.scheduled - t.begin, t.built - t.scheduled, t.submitted - t.built)
        self.records.append(rec)
        self.by_id[rec.step_id] = rec

    def step_processed(self, step_id: int, t: ProcessTimes) -> None:
        rec = self.by_id[step_id]
        rec.t_collect, rec.wait_s, rec.process_s = t.collect, t.collected - t.collect, t.processed - t.collected
