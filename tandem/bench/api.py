"""Python entry point of the benchmark: ``tandem.bench.api.bench(model, ...)``."""
from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tandem.bench.constants import GPU_DEFAULT_MODEL, SIMULATED_DEVICE, VALID_MODES
from tandem.bench.report import provenance, record, report_real, write_json
from tandem.bench.runner import AUTO_BUDGET_S, run_benchmark, weight_storage
from tandem.bench.simulated import CPU_NOTE, CPU_NOTE_OFF, CPU_NOTE_SIMULATED, SIM_OPTIONS, intro, report, simulate
from tandem.bench.spread import median_run, spread_record
from tandem.bench.step_time import STEP_TIME_MODELS, step_time_model
from tandem.bench.workload import BenchRequest, LengthRange, Workload, bench_params
from tandem.bench.timeline import draw_timeline, write_trace
from tandem.config import EngineConfig
from tandem.llm import LLM


def bench(model: str = "random:tiny", *, modes: list[str] = ("sync", "async"), num_requests: int = 32,
          prompt_len: int | str = 256, max_tokens: int | str = 1024, temperature: float = 0.0,
          workload_seed: int = 0, request_rate: float | None = None, logprobs: int | None = None,
          shared_prefix_len: int = 0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
          repetition_penalty: float = 1.0, structured_output: str | None = None, repeat_span: int = 0,
          compare_hf: bool = False,
          hf_modes: list[str] | None = None,
          json_path: str | Path | None = None, timeline: str | Path | None = None,
          trace: str | Path | None = None,
          timeline_steps: int = 8, progress: bool = True, llm: LLM | None = None, runs: int | None = 1,
          simulated_device: str = "off", simulated_runs: int = 5, **engine_options: Any) -> dict[str, Any]:
    """Run the workload through each mode; print a table; return (and optionally save) every figure.
    ``prompt_len`` and ``max_tokens`` are a number or a ``"MIN:MAX"`` range (seeded uniform); every
    prompt starts with the same ``shared_prefix_len`` tokens; ``repeat_span`` > 0 makes each prompt
    its first that many tokens repeated. ``llm``: an engine already loaded (its
    options are used; several workloads then share one model load). ``runs``: rounds of every mode
    (None: up to 5 while fast enough); ``simulated_device``: one of ``SIMULATED_DEVICE``, the same
    workload against a GPU's measured step times (``simulated_runs`` rounds)."""
    bad = [m for m in modes if m not in VALID_MODES]
    if bad or not modes:
        raise ValueError(f"modes must be some of {VALID_MODES}, got {list(modes)}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s, got {request_rate!r}")
    if simulated_device not in SIMULATED_DEVICE:
        raise ValueError(f"simulated_device must be one of {SIMULATED_DEVICE}, got {simulated_device!r}")
    if simulated_device == "only":
        _refuse_without_a_model(compare_hf, timeline, trace, engine_options)
    if (runs is not None and runs < 1) or simulated_runs < 1:
        raise ValueError(f"runs and simulated_runs must be >= 1, got {runs} and {simulated_runs}")
    w = Workload(num_requests, LengthRange.parse(prompt_len), LengthRange.parse(max_tokens), workload_seed,
                 temperature, request_rate, logprobs, shared_prefix_len, presence_penalty, frequency_penalty,
                 repetition_penalty, structured_output, repeat_span)
    if compare_hf and not (w.prompt_len.fixed and w.max_tokens.fixed and request_rate is None):
        raise ValueError("--compare-hf needs fixed lengths and no request rate (transformers' generate_batch "
                         "takes one length for all requests)")
    if compare_hf and engine_options.get("tensor_parallel_size", 1) > 1:
        raise ValueError("--compare-hf runs transformers on one device: not with --tensor-parallel-size")
    if engine_options.get("max_model_len") is None:  # graphs gather whole block tables: keep them short
        engine_options["max_model_len"] = w.prompt_len.hi + w.max_tokens.hi
    data: dict[str, Any] = {**provenance(), "workload": w.record()}
    on_cpu = False
    if simulated_device != "only":
        data = _real_bench(model, w, list(modes), runs, llm, compare_hf, hf_modes, timeline, trace, timeline_steps,
                           progress, engine_options, simulated_device)
        on_cpu = data["device_type"] == "cpu"
    if simulated_device in ("on", "only") or (simulated_device == "auto" and on_cpu):
        sim_model = model if model in STEP_TIME_MODELS else GPU_DEFAULT_MODEL
        print("\n" + intro(step_time_model(sim_model), w, list(modes)), flush=True)
        sim = simulate(sim_model, w, list(modes), simulated_runs, **engine_options)
        print(report(sim))
        data["simulated"] = sim.record()
    if json_path is not None:
        write_json(data, Path(json_path))
    return data


def _refuse_without_a_model(compare_hf: bool, timeline: Any, trace: Any, engine_options: dict[str, Any]) -> None:
    """``simulated_device="only"`` computes no model: what only a real run uses is an error, not ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    named = [flag for flag, given in (("--compare-hf", compare_hf), ("--timeline", timeline is not None),
                                      ("--trace", trace is not None)) if given]
    named += [f"--{k.replace('_', '-')}" for k, v in engine_options.items()
              if k not in SIM_OPTIONS and v != defaults.get(k)]
    if named:
        raise ValueError(f"--simulated-device only computes no model, so {', '.join(named)} would change nothing "
                         f"(they apply to the real run: --simulated-device on runs both)")


def _real_bench(model: str, w: Workload, modes: list[str], runs: int | None, llm: LLM | None, compare_hf: bool,
                hf_modes: list[str] | None, timeline: str | Path | None, trace: str | Path | None,
                timeline_steps: int, progress: bool, engine_options: dict[str, Any],
                simulated_device: str = "off") -> dict[str, Any]:
    """The model computed on this machine's device; what it prints, and its record."""
    threads = torch.get_num_threads()  # before an async CPU executor gives the host thread one
    owned = llm is None
    if owned:
        llm = LLM(model, **engine_options)
    engine, info = llm.engine, llm.engine.worker.info
    if w.structured_output:  # compile the schema (and read the vocabulary) before anything is timed
        engine.core.grammars.compiler.compile(bench_params(w, 1).structured_outputs).result()
    quantization, storage = weight_storage(llm)
    weight_dtype = info.dtype if storage is None else storage.dtype
    quant = "" if quantization is None else f", quantization {quantization}"
    kv_dtype = info.kv_cache_dtype or info.dtype
    print(f"tandem bench: {model} on {info.device_name}, {threads} torch threads\n"
          f"dtype {info.dtype} (weights {weight_dtype}{quant}; KV cache {kv_dtype})\n"
          + textwrap.fill(f"{w.describe()}, modes {', '.join(modes)}", 100, break_on_hyphens=False), flush=True)
    if info.device == "cpu":  # before the figures, which a CPU cannot make mean what they would on a GPU
        note = f"{CPU_NOTE} {CPU_NOTE_OFF if simulated_device == 'off' else CPU_NOTE_SIMULATED}"
        print(textwrap.fill(note, 100, break_on_hyphens=False), flush=True)
    by_mode, ceilings, requests = run_benchmark(llm, modes, w, progress=progress, runs=runs)
    picked = {mode: ms[median_run([r.result for r in ms])] for mode, ms in by_mode.items()}
    results = [run.result for run in picked.values()]
    token_lists = [run.token_ids for ms in by_mode.values() for run in ms]
    anchors = _hf_anchors(llm, w, requests, hf_modes, token_lists[0]) if compare_hf else None
    kv_tokens = (info.num_kv_blocks - 1) * info.block_size
    meta = {"model": model, "device": info.device_name, "device_type": info.device.split(":")[0], "dtype": info.dtype, "weight_dtype": weight_dtype,
            "quantization": quantization, "kv_cache_dtype": kv_dtype, "torch_threads": threads,
            "workload": w.record(), "max_model_len": info.max_model_len, "max_num_seqs": engine.config.max_num_seqs,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "kv_cache_blocks": info.num_kv_blocks - 1, "block_size": info.block_size,
            "cuda_graphs": bool(info.graph_batch_sizes), "prefix_caching": engine.core.prefix_caching,
            "tensor_parallel_size": engine.config.tensor_parallel_size,
            "ceilings": None if ceilings is None else asdict(ceilings),
            "outputs_identical_across_modes": all(t == token_lists[0] for t in token_lists),
            # compares runs in different processes (a kernel variant on and off gives the same tokens)
            "outputs_digest": hashlib.sha256(repr(token_lists[0]).encode()).hexdigest()[:16]}
    data = record(results, meta, anchors)
    report_real(by_mode, results, anchors, meta, gpu=info.device.startswith("cuda"),
                need=min(len(requests), engine.config.max_num_seqs) * (w.prompt_len.hi + w.max_tokens.hi),
                kv_tokens=kv_tokens)
    if runs is None and len(next(iter(by_mode.values()))) == 1:
        took = sum(ms[0].result.wall_s for ms in by_mode.values())
        print(f"one run of each mode: a round took {took:.0f} s (more rounds run while they fit in "
              f"{AUTO_BUDGET_S:.0f} s; --runs N asks for N)")
    if len(next(iter(by_mode.values()))) > 1:
        data["spread"] = spread_record({m: [r.result for r in ms] for m, ms in by_mode.items()})
    title = f"{model}, {w.describe()}, {meta['device']}"
    if timeline is not None:
        draw_timeline(results, Path(timeline), timeline_steps, title)
    if trace is not None:
        write_trace(results, Path(trace))
    if owned and engine.config.tensor_parallel_size > 1:
        engine.shutdown()  # the other ranks' processes and GPUs are free again when bench() returns
    return data


def _hf_anchors(llm: LLM, w: Workload, requests: list[BenchRequest], hf_modes: list[str] | None,
                ours: list[list[int]]) -> list[dict]:
    from tandem.bench.hf_anchor import run_hf_anchor

    anchors = run_hf_anchor(llm, [r.prompt for r in requests], w, hf_modes)
    for a in anchors:
        ids = a.pop("token_ids", None)
        if ids is not None:  # agreement with our first mode: numerics differ by kernel, so not exact
            a["first_token_agreement"] = sum(x[:1] == y[:1] for x, y in zip(ids, ours)) / len(ours)
    return anchors
