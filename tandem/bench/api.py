"""Python entry point of the benchmark: ``tandem.bench.api.bench(model, ...)``."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tandem.bench.report import decode_check_text, record, table, write_json
from tandem.bench.runner import run_benchmark, weight_storage
from tandem.bench.workload import BenchRequest, LengthRange, Workload, bench_params
from tandem.bench.timeline import draw_timeline, write_trace
from tandem.llm import LLM

VALID_MODES = ("sync", "async")


def bench(model: str = "random:tiny", *, modes: list[str] = ("sync", "async"), num_requests: int = 32,
          prompt_len: int | str = 256, max_tokens: int | str = 1024, temperature: float = 0.0,
          workload_seed: int = 0, request_rate: float | None = None, logprobs: int | None = None,
          shared_prefix_len: int = 0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
          repetition_penalty: float = 1.0, structured_output: str | None = None, compare_hf: bool = False,
          hf_modes: list[str] | None = None,
          json_path: str | Path | None = None, timeline: str | Path | None = None,
          trace: str | Path | None = None,
          timeline_steps: int = 8, progress: bool = True, llm: LLM | None = None,
          **engine_options: Any) -> dict[str, Any]:
    """Run the workload through each mode; print a table; return (and optionally save) every figure.
    ``prompt_len`` and ``max_tokens`` are a number or a ``"MIN:MAX"`` range (seeded uniform); every
    prompt starts with the same ``shared_prefix_len`` tokens. ``llm``: an engine already loaded (its
    options are used; several workloads then share one model load)."""
    bad = [m for m in modes if m not in VALID_MODES]
    if bad or not modes:
        raise ValueError(f"modes must be some of {VALID_MODES}, got {list(modes)}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s, got {request_rate!r}")
    w = Workload(num_requests, LengthRange.parse(prompt_len), LengthRange.parse(max_tokens), workload_seed,
                 temperature, request_rate, logprobs, shared_prefix_len, presence_penalty, frequency_penalty,
                 repetition_penalty, structured_output)
    if compare_hf and not (w.prompt_len.fixed and w.max_tokens.fixed and request_rate is None):
        raise ValueError("--compare-hf needs fixed lengths and no request rate (transformers' generate_batch "
                         "takes one length for all requests)")
    if compare_hf and engine_options.get("tensor_parallel_size", 1) > 1:
        raise ValueError("--compare-hf runs transformers on one device: not with --tensor-parallel-size")
    if engine_options.get("max_model_len") is None:  # graphs gather whole block tables: keep them short
        engine_options["max_model_len"] = w.prompt_len.hi + w.max_tokens.hi
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
    print(f"tandem bench: {model} on {info.device_name} ({info.dtype}; weights {weight_dtype}{quant}; KV cache "
          f"{kv_dtype}), {threads} torch threads; {w.describe()}, modes {', '.join(modes)}", flush=True)
    runs, ceilings, requests = run_benchmark(llm, list(modes), w, progress=progress)
    results = [run.result for run in runs.values()]
    token_lists = [run.token_ids for run in runs.values()]
    anchors = _hf_anchors(llm, w, requests, hf_modes, token_lists[0]) if compare_hf else None
    meta = {"model": model, "device": info.device_name, "dtype": info.dtype, "weight_dtype": weight_dtype,
            "quantization": quantization, "kv_cache_dtype": kv_dtype, "torch_threads": threads,
            "workload": w.record(), "max_model_len": info.max_model_len, "max_num_seqs": engine.config.max_num_seqs,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "kv_cache_blocks": info.num_kv_blocks - 1, "block_size": info.block_size,
            "cuda_graphs": bool(info.graph_batch_sizes), "prefix_caching": engine.core.prefix_caching,
            "tensor_parallel_size": engine.config.tensor_parallel_size,
            "ceilings": None if ceilings is None else asdict(ceilings),
            "outputs_identical_across_modes": all(t == token_lists[0] for t in token_lists)}
    data = record(results, meta, anchors)
    print(table(results, anchors))
    for res in results:
        print(decode_check_text(res))
    print(f"outputs identical across modes: {meta['outputs_identical_across_modes']}")
    if json_path is not None:
        write_json(data, Path(json_path))
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
