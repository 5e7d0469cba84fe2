"""From a run's step log and device events to the figures a benchmark reports."""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean

from tandem.bench.roofline import Ceilings, FloorModel
from tandem.bench.step_log import StepRecord
from tandem.contract.worker import StepInterval


@dataclass
class ModeResult:
    mode: str
    wall_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    num_steps: int
    num_preemptions: int
    prefill_tokens_computed: int  # tokens computed other than decodes: prompts less cache hits, recomputes
    output_tok_per_s: float
    total_tok_per_s: float
    mean_schedule_ms: float
    mean_build_ms: float
    mean_submit_ms: float
    mean_wait_ms: float
    mean_process_ms: float
    mean_gpu_ms: float | None = None
    gpu_idle_fraction: float | None = None
    gpu_idle_fraction_decode: float | None = None
    floor_s: float | None = None
    roofline_fraction: float | None = None  # floor / wall time
    roofline_fraction_gpu: float | None = None  # floor / GPU busy time
    decode_step_check: dict | None = None
    largest_gaps: list[dict] | None = None  # where the idle time went: the longest gaps, with their steps
    idle_breakdown: dict | None = None  # all of it: by gap size, and by what the step after each gap carried
    #: the host thread while planning steps: wall and CPU ms summed, involuntary context switches
    #: and minor page faults (see ``StepRecord``)
    host_thread: dict | None = None
    gc_pauses: dict | None = None  # Python's garbage collector during the run: count, total and longest pause
    prefix_cache_queries: int | None = None  # tokens looked up in the prefix cache (None: caching off)
    prefix_cache_hits: int | None = None  # tokens found there, whose prefill was skipped
    prefix_cache_hit_rate: float | None = None
    #: speculative decoding (None: off): proposals verified and accepted, and what that gave
    spec_draft_tokens: int | None = None
    spec_accepted_tokens: int | None = None
    spec_acceptance_rate: float | None = None  # accepted / verified proposals
    spec_tokens_per_step: float | None = None  # tokens a speculating sequence gained per step, on average
    timeline: dict = field(default_factory=dict, repr=False)  # host and device lanes, for pictures

    @property
    def mean_host_ms(self) -> float:
        """The host's work per step: schedule + build + submit + process."""
        return self.mean_schedule_ms + self.mean_build_ms + self.mean_submit_ms + self.mean_process_ms

    def set_speculation(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        self.spec_draft_tokens, self.spec_accepted_tokens = draft_tokens, accepted
        self.spec_acceptance_rate = accepted / draft_tokens if draft_tokens else None
        self.spec_tokens_per_step = 1 + accepted / drafts if drafts else None

    def set_prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_cache_queries, self.prefix_cache_hits = queries, hits
        self.prefix_cache_hit_rate = hits / queries if queries else None


def idle_fraction(intervals: list[StepInterval]) -> float | None:
    """Gaps between one step's end and the next one's start, over first start to last end."""
    if len(intervals) < 2:
        return None
    spans = sorted(intervals, key=lambda i: i.start)
    gaps = sum(max(0.0, b.start - a.end) for a, b in zip(spans, spans[1:]))
    return gaps / (spans[-1].end - spans[0].start)


def largest_gaps(intervals: list[StepInterval], records: dict[int, StepRecord], n: int = 5) -> list[dict]:
    spans = sorted(intervals, key=lambda i: i.start)
    gaps = [(b.start - a.end, a.step_id, b.step_id) for a, b in zip(spans, spans[1:])]
    return [{"gap_ms": g * 1e3, "after_step": a, "before_step": b,
             "decode_pair": _pure_decode(records.get(a)) and _pure_decode(records.get(b)),
             "host_ms": _host_phases(records.get(a), records.get(b))}
            for g, a, b in sorted(gaps, reverse=True)[:n]]


#: the gap sizes the idle time is split by, in ms
GAP_CLASSES = ((0.05, "<0.05"), (0.2, "0.05-0.2"), (1.0, "0.2-1"), (5.0, "1-5"), (float("inf"), ">=5"))


def idle_breakdown(segments: list[list[StepInterval]], records: dict[int, StepRecord]) -> dict:
    """The idle time between consecutive steps of each segment, by gap size (ms: gaps and idle ms per
    class) and by the step after the gap (one with prefill, or decode only). Many short gaps point at
    the host's steady cost per step; a few long ones before prefill steps at admissions."""
    by_size = {label: {"gaps": 0, "idle_ms": 0.0} for _, label in GAP_CLASSES}
    before = {"prefill": 0.0, "decode": 0.0}
    for segment in segments:
        spans = sorted(segment, key=lambda i: i.start)
        for a, b in zip(spans, spans[1:]):
            ms = (b.start - a.end) * 1e3
            if ms > 0:
                cls = by_size[next(label for top, label in GAP_CLASSES if ms < top)]
                cls["gaps"] += 1
                cls["idle_ms"] += ms
                before["decode" if _pure_decode(records.get(b.step_id)) else "prefill"] += ms
    return {"by_gap_ms": by_size, "before_prefill_ms": before["prefill"], "before_decode_ms": before["decode"]}


def _pure_decode(record: StepRecord | None) -> bool:
    """A step with no prefill in it; None (device work between steps, a draft model's) counts as one."""
    return record is None or record.num_decode == record.num_seqs


def _host_phases(before: StepRecord | None, after: StepRecord | None) -> dict | None:
    """What the host was doing around a gap: the earlier step's processing, the later one's planning."""
    if before is None or after is None:
        return None
    return {"wait_before": before.wait_s * 1e3, "process_before": before.process_s * 1e3,
            "schedule_after": after.schedule_s * 1e3, "build_after": after.build_s * 1e3,
            "submit_after": after.submit_s * 1e3, "num_seqs_after": after.num_seqs, "num_tokens_after": after.num_tokens,
            "plan_wall_after": after.plan_wall_s * 1e3, "plan_cpu_after": after.plan_cpu_s * 1e3,
            "plan_preempted_after": after.plan_preempted, "plan_page_faults_after": after.plan_page_faults}


def decode_idle_fraction(intervals: list[StepInterval], records: dict[int, StepRecord]) -> float | None:
    """Idle fraction over runs of consecutive pure-decode steps (no prefill in the step)."""
    spans = sorted(intervals, key=lambda i: i.start)
    pure = [_pure_decode(records.get(i.step_id)) for i in spans]
    busy = gaps = 0.0
    for k in range(len(spans) - 1):
        if pure[k] and pure[k + 1]:
            busy += spans[k].end - spans[k].start
            gaps += max(0.0, spans[k + 1].start - spans[k].end)
    return gaps / (busy + gaps) if busy + gaps > 0 else None


def host_lanes(records: list[StepRecord]) -> list[tuple[int, str, float, float]]:
    """(step id, phase, start, end) host segments, on the host clock."""
    out = []
    for r in records:
        t = r.t_begin
        for phase, dur in (("schedule", r.schedule_s), ("build", r.build_s), ("submit", r.submit_s)):
            out.append((r.step_id, phase, t, t + dur))
            t += dur
        out.append((r.step_id, "wait", r.t_collect, r.t_collect + r.wait_s))
        out.append((r.step_id, "process", r.t_collect + r.wait_s, r.t_collect + r.wait_s + r.process_s))
    return out


def summarise(mode: str, wall_s: float, records: list[StepRecord], intervals: list[StepInterval],
              prompt_tokens: int, output_tokens: int, num_requests: int, num_preemptions: int,
              floor: FloorModel | None, ceilings: Ceilings | None) -> ModeResult:
    by_id = {r.step_id: r for r in records}
    ms = lambda xs: fmean(xs) * 1e3 if xs else 0.0  # noqa: E731
    res = ModeResult(
        mode=mode, wall_s=wall_s, num_requests=num_requests, prompt_tokens=prompt_tokens,
        output_tokens=output_tokens, num_steps=len(records), num_preemptions=num_preemptions,
        prefill_tokens_computed=sum(r.num_tokens - r.num_decode for r in records),
        output_tok_per_s=output_tokens / wall_s, total_tok_per_s=(prompt_tokens + output_tokens) / wall_s,
        mean_schedule_ms=ms([r.schedule_s for r in records]), mean_build_ms=ms([r.build_s for r in records]),
        mean_submit_ms=ms([r.submit_s for r in records]), mean_wait_ms=ms([r.wait_s for r in records]),
        mean_process_ms=ms([r.process_s for r in records]))
    res.host_thread = {"plan_wall_ms": sum(r.plan_wall_s for r in records) * 1e3,
                       "plan_cpu_ms": sum(r.plan_cpu_s for r in records) * 1e3,
                       "preempted": sum(r.plan_preempted for r in records),
                       "page_faults": sum(r.plan_page_faults for r in records)}
    res.timeline = {"host": host_lanes(records), "gpu": [(i.step_id, i.start, i.end) for i in intervals],
                    "decode_steps": [r.step_id for r in records if r.num_decode == r.num_seqs]}
    steps = [i for i in intervals if i.step_id in by_id]  # the rest: device work between steps (a draft's)
    if steps:
        busy = sum(i.end - i.start for i in intervals)
        res.mean_gpu_ms = sum(i.end - i.start for i in steps) / len(steps) * 1e3
        res.gpu_idle_fraction = idle_fraction(intervals)
        res.gpu_idle_fraction_decode = decode_idle_fraction(intervals, by_id)
        res.largest_gaps = largest_gaps(intervals, by_id)
        res.idle_breakdown = idle_breakdown([intervals], by_id)
        if floor is not None and ceilings is not None:
            res.floor_s = sum(floor.step_cost(r).floor_s(ceilings) for r in records)
            res.roofline_fraction = res.floor_s / wall_s
            res.roofline_fraction_gpu = res.floor_s / busy
            res.decode_step_check = _decode_check(steps, by_id, floor, ceilings)
    return res


def _decode_check(intervals: list[StepInterval], by_id: dict[int, StepRecord], floor: FloorModel,
                  ceilings: Ceilings) -> dict | None:
    """The floor model spelled out for one steady decode step (the middle pure-decode one)."""
    decodes = [i for i in intervals if by_id[i.step_id].num_decode == by_id[i.step_id].num_seqs]
    if not decodes:
        return None
    mid = decodes[len(decodes) // 2]
    return floor.describe(by_id[mid.step_id], ceilings, mid.end - mid.start)
