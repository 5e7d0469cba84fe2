"""``tandem bench --host-only``: the host loop with a device that returns at once, at several batch
sizes. What it reports is the host's time per pure-decode step (schedule + build + submit +
process): the budget asynchronous batching must hide behind each GPU step; and the whole turn of
the offline loop (``loop ms``: those phases plus turning tokens into outputs, which the server does
in its API process instead). With structured output (``--structured-output json``) processing
includes the grammar work: advancing each request's matcher and filling the next step's mask, whose
median alone is ``mask ms``."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from statistics import median

from tandem.bench.driver import drive
from tandem.bench.fake_worker import FakeWorker
from tandem.bench.gc_watch import GcPauses
from tandem.bench.step_log import StepLog
from tandem.bench.workload import LengthRange, Workload, make_requests
from tandem.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine


@dataclass
class HostFigures:
    num_seqs: int
    steps: int  # pure-decode steps measured
    schedule_ms: float  # medians over those steps
    build_ms: float
    submit_ms: float
    process_ms: float
    loop_ms: float  # a whole turn of the loop: the phases, output processing (LLMEngine) and the rest
    gc: dict
    mask_ms: float = 0.0  # structured output: filling one step's grammar masks (part of process_ms)

    @property
    def total_ms(self) -> float:
        return self.schedule_ms + self.build_ms + self.submit_ms + self.process_ms


def measure(model: str, num_seqs: int, prompt_len: int, max_tokens: int, sampling: dict | None = None,
            **options) -> HostFigures:
    """``sampling``: the workload's request settings (``Workload`` fields: logprobs, penalties...)."""
    config = EngineConfig.from_options(model, max_num_seqs=num_seqs, **options)
    device = FakeWorker(config)
    engine = LLMEngine(config, device)
    w = Workload(num_seqs, LengthRange(prompt_len, prompt_len), LengthRange(max_tokens, max_tokens),
                 **(sampling or {}))
    requests = make_requests(w, engine.model_config.vocab_size)
    log = StepLog()
    engine.core.observers.append(log)
    if w.structured_output:
        engine.core.grammars.fill_times = []
    with GcPauses() as pauses:
        drive(engine, w, requests, progress=False)
    full = [r for r in log.records if r.num_decode == r.num_seqs == num_seqs]
    for r in full:  # the fake device picks each masked step's tokens as the host hands it the mask: just before it
        r.submit_s -= device.mask_device_s.get(r.step_id - 1, 0.0)  # submits the next step (EngineCore._provide_mask)
    fills = engine.core.structured.fill_times if engine.core.structured is not None else None
    ms = lambda xs: median(xs) * 1e3 if xs else 0.0  # noqa: E731
    turns = [b.t_begin - a.t_begin for a, b in zip(full, full[1:]) if b.step_id == a.step_id + 1]
    return HostFigures(num_seqs, len(full), ms([r.schedule_s for r in full]), ms([r.build_s for r in full]),
                       ms([r.submit_s for r in full]), ms([r.process_s for r in full]), ms(turns), pauses.summary(),
                       ms(fills or []))


def host_only(model: str, batch_sizes: list[int], prompt_len: int, max_tokens: int, sampling: dict | None = None,
              **options) -> list[HostFigures]:
    w = Workload(1, LengthRange(prompt_len, prompt_len), LengthRange(max_tokens, max_tokens), **(sampling or {}))
    print(f"tandem bench --host-only: {model}, pure-decode steps with a device that returns at once; "
          f"{w.describe().replace('1 requests x ', '')} per sequence; prefix caching "
          f"{'on' if options.get('enable_prefix_caching', True) else 'off'}")
    print(f"{'seqs':>6} {'steps':>6} {'sched ms':>9} {'build ms':>9} {'submit ms':>9} {'process ms':>10} "
          f"{'host ms':>8} {'loop ms':>8} {'mask ms':>8} {'gc pauses':>18}")
    results = []
    for n in batch_sizes:
        gc.collect()
        t0 = time.perf_counter()
        f = measure(model, n, prompt_len, max_tokens, sampling, **options)
        results.append(f)
        print(f"{n:>6} {f.steps:>6} {f.schedule_ms:>9.3f} {f.build_ms:>9.3f} {f.submit_ms:>9.3f} {f.process_ms:>10.3f} "
              f"{f.total_ms:>8.3f} {f.loop_ms:>8.3f} {f.mask_ms:>8.3f} {f.gc['collections']:>4} ({f.gc['max_ms']:.1f} ms max)"
              f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
    return results
