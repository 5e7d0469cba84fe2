"""``tandem bench`` against a simulated GPU: what async batching buys, measurable on any machine.

The engine is the real one (scheduler, batch builder, submission, output processing, on this CPU);
the device is ``SimulatedDevice``, whose steps take an H100's measured time (``step_time``) on a
virtual clock that counts the host's CPU time. The host's work is the only thing the modes differ in: sync leaves the GPU
idle while the host plans each step, async plans step N+1 while step N runs. Each mode runs
``runs`` times, alternating, and every figure is given as median [min-max]."""
from __future__ import annotations

import gc
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from tandem.bench.driver import drive
from tandem.bench.measure import measure_mode
from tandem.bench.metrics import ModeResult
from tandem.bench.report import preemption_text, table
from tandem.bench.sim_device import SimulatedDevice
from tandem.bench.spread import Spread, median_run, ratio_text, spread_record, spread_table, spreads
from tandem.bench.step_time import StepTimeModel, step_time_model
from tandem.bench.workload import BenchRequest, Workload, make_requests
from tandem.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine

#: the engine options the simulated run takes (the host loop's); the model's and the device's
#: (dtype, quantization, tensor parallelism...) belong to the real run only
SIM_OPTIONS = ("max_model_len", "allow_long_max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
               "kv_cache_tokens", "enable_prefix_caching", "seed", "max_stop_strings", "max_stop_string_length")

CPU_NOTE = (
    "On a CPU: this run computes the model on this machine's cores, and its 'device' is a worker thread "
    "that shares those cores with the host thread. It shows that the engine works end to end, that sync and "
    "async give the same tokens, and what the host's work per step costs here. It cannot show the overlap: "
    "host and device compete for the same cores, so which mode is faster here says nothing about a GPU, and "
    "the times swing with whatever else runs, sync's most.")
CPU_NOTE_SIMULATED = "The simulated GPU after it shows the overlap instead."
CPU_NOTE_OFF = "--simulated-device on shows the overlap against a simulated GPU."


@dataclass
class SimulatedRuns:
    clock: StepTimeModel
    by_mode: dict[str, list[ModeResult]]
    kv_tokens: int  # what the simulated KV cache holds
    need: int  # the most KV tokens the workload's running requests can hold at once

    def medians(self) -> list[ModeResult]:
        return [results[median_run(results)] for results in self.by_mode.values()]

    def record(self) -> dict[str, Any]:
        return {"step_times": self.clock.describe(), "step_time_sources": self.clock.sources, "runs": len(next(iter(self.by_mode.values()))),
                "modes": {r.mode: {k: v for k, v in asdict(r).items() if k != "timeline"} for r in self.medians()},
                "spread": spread_record(self.by_mode),
                "kv_cache_tokens": self.kv_tokens}


def _warm_up(engine: LLMEngine, w: Workload, requests: list[BenchRequest], modes: list[str]) -> None:
    """First calls of every path (imports, caches) before anything is timed."""
    few = [BenchRequest(r.prompt, min(4, r.max_tokens), 0.0) for r in requests[:2]]
    for mode in modes:
        engine.core.set_async(mode == "async")
        drive(engine, w, few, False, engine.worker.now, engine.worker.wait)


def simulate(model: str, w: Workload, modes: list[str], runs: int, **options: Any) -> SimulatedRuns:
    """``model``: the preset whose measured step times to use (others get the 1B's); ``options``:
    engine options, of which ``SIM_OPTIONS`` apply."""
    clock = step_time_model(model)
    config = EngineConfig.from_options(clock.model, **{k: v for k, v in options.items() if k in SIM_OPTIONS})
    device = SimulatedDevice(config, clock)
    engine = LLMEngine(config, device)
    info = engine.worker.info
    requests = make_requests(w, engine.model_config.vocab_size)
    if w.structured_output:  # compile the schema before anything is timed
        from tandem.bench.workload import bench_params

        engine.core.grammars.compiler.compile(bench_params(w, 1).structured_outputs).result()
    _warm_up(engine, w, requests, modes)
    by_mode: dict[str, list[ModeResult]] = {m: [] for m in modes}
    for _ in range(runs):  # modes alternate, so a change of load on the machine reaches both
        for mode in modes:
            run = measure_mode(engine, mode, requests, w, None, None, False, device.now, device.wait)
            by_mode[mode].append(run.result)
            gc.collect()
    engine.shutdown()
    need = min(len(requests), config.max_num_seqs) * (w.prompt_len.hi + w.max_tokens.hi)
    return SimulatedRuns(clock, by_mode, (info.num_kv_blocks - 1) * info.block_size, need)


def intro(clock: StepTimeModel, w: Workload, modes: list[str]) -> str:
    text = (f"Simulated GPU: this engine's host loop, on this CPU, against a device whose steps take as long as "
            f"they took on a GPU ({clock.describe()}). Time is virtual: the host's is its thread's CPU time, the "
            f"device's the measured step times; nothing sleeps or spins, so these figures hold on a busy machine. "
            f"{w.describe()}, modes {', '.join(modes)}.")
    return textwrap.fill(text, 100, break_on_hyphens=False)


def report(sim: SimulatedRuns) -> str:
    """The simulated part's figures: the spread over runs, the ratio, the idle time, the median runs."""
    medians = sim.medians()
    runs = len(next(iter(sim.by_mode.values())))
    lines = [f"{runs} run{'s' if runs > 1 else ''} of each mode, median [min-max]:", spread_table(sim.by_mode, gpu=True)]
    ratio = ratio_text(sim.by_mode)
    if ratio:
        lines.append(ratio)
    if "sync" in sim.by_mode and "async" in sim.by_mode:
        s, a = (spreads(sim.by_mode[m]) for m in ("sync", "async"))
        idle, step = s["gpu_idle_fraction"].median, Spread.of([r.mean_gpu_ms for r in sim.by_mode["sync"]]).median
        lines.append(textwrap.fill(
            f"GPU idle: sync {idle:.1%} -> async {a['gpu_idle_fraction'].median:.1%}. In sync the GPU waits "
            f"{idle / (1 - idle) * step:.2f} ms a step while the host takes its tokens in and plans the next; async "
            f"does that while the GPU runs the step ({step:.2f} ms on average).", 100))
    # no wait column: the host waits on the virtual clock, in no time
    lines += [f"the median run{'s' if len(medians) > 1 else ''}:", table(medians, skip=("mean_wait_ms",)),
              preemption_text(medians, sim.kv_tokens, sim.need)]
    return "\n".join(lines)
