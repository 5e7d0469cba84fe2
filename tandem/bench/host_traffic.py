"""``tandem bench --host-only`` with length ranges: the host loop over real traffic (prompts and
outputs of every length, prefill chunks mixed into decode steps, preemption when the KV cache given
with ``--kv-cache-tokens`` runs short) with a device that returns at once.

What it reports is the tail, not the median: with asynchronous batching a step's host work is hidden
only while it is shorter than the device's step, so a slow step (a mixed step, one planned one
sequence at a time because blocks ran short) is a GPU gap. Percentiles per phase, for mixed steps and
for pure-decode steps apart."""
from __future__ import annotations

import numpy as np

from tandem.bench.driver import drive
from tandem.bench.fake_worker import FakeWorker
from tandem.bench.gc_watch import GcPauses
from tandem.bench.step_log import StepLog, StepRecord
from tandem.bench.workload import Workload, make_requests
from tandem.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine

_PHASES = ("schedule", "build", "process")


def _percentiles(records: list[StepRecord], phase: str) -> tuple[float, float, float]:
    ms = np.array([getattr(r, f"{phase}_s") for r in records]) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99)), float(ms.max())


def measure_traffic(model: str, w: Workload, **options) -> dict[str, dict]:
    """{"mixed" | "decode": {"steps": n, phase: (p50, p99, max) ms}} plus "preemptions" and "gc"."""
    config = EngineConfig.from_options(model, **options)
    engine = LLMEngine(config, FakeWorker(config))
    requests = make_requests(w, engine.model_config.vocab_size)
    log = StepLog()
    engine.core.observers.append(log)
    with GcPauses() as pauses:
        drive(engine, w, requests, progress=False)
    out: dict[str, dict] = {}
    for kind, keep in (("mixed", lambda r: r.num_decode != r.num_seqs), ("decode", lambda r: r.num_decode == r.num_seqs)):
        records = [r for r in log.records if keep(r)]
        if records:
            out[kind] = {"steps": len(records), **{p: _percentiles(records, p) for p in _PHASES}}
    out["preemptions"] = engine.core.scheduler.num_preemptions
    out["gc"] = pauses.summary()
    return out


def host_traffic(model: str, w: Workload, **options) -> dict[str, dict]:
    print(f"tandem bench --host-only: {model}, {w.describe()}, max_num_seqs {options.get('max_num_seqs')}, "
          f"KV cache {options.get('kv_cache_tokens') or 'unbounded'} tokens; a device that returns at once")
    f = measure_traffic(model, w, **options)
    print(f"{'steps':>14} {'n':>6} " + " ".join(f"{p + ' p50/p99/max ms':>26}" for p in _PHASES))
    for kind in ("mixed", "decode"):
        if kind in f:
            cells = " ".join(f"{'%.3f / %.3f / %.2f' % f[kind][p]:>26}" for p in _PHASES)
            print(f"{kind:>14} {f[kind]['steps']:>6} {cells}")
    print(f"preemptions {f['preemptions']}; collector: {f['gc']['collections']} pauses, {f['gc']['max_ms']:.1f} ms max")
    return f
