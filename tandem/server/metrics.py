"""Prometheus metrics under vLLM's names and types, each labelled ``model_name`` and ``engine`` (the
engine core's index: several under data parallelism), plus what only this engine measures (the GPU
idle fraction, the API process's open requests; always under ``tandem:``).

``--metrics-prefix`` picks the names: ``vllm`` (``vllm:num_requests_running`` ..., so vLLM's
dashboards and the Gateway API Inference Extension's endpoint picker read them unchanged, with
vLLM's older aliases ``vllm:gpu_cache_usage_perc`` and ``vllm:time_per_output_token_seconds``),
``tandem`` (``tandem:num_requests_running`` ...), or ``both`` (the default).

The figures are plain numbers per engine (``EngineFigures``); one collector turns them into metric
families at scrape time. Latencies are collected per step, not per token: the API process receives
one message per engine step carrying every request's new token, so the histograms take a whole
step's observations at once (one numpy pass)."""
from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from tandem.server.messages import Stats

METRICS_PREFIXES = ("tandem", "vllm", "both")
DEFAULT_METRICS_PREFIX = "both"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class BatchHistogram:
    """A histogram's bucket counts and sum, taking many observations per call."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one is +Inf
        self.total = 0.0

    def observe_many(self, values: list[float]) -> None:
        if not values:
            return
        arr = np.asarray(values, dtype=np.float64)
        # the first bucket whose upper bound is >= the value ("le" semantics)
        self.counts += np.bincount(np.searchsorted(self.bounds, arr, side="left"), minlength=len(self.counts))
        self.total += float(arr.sum())

    def buckets(self) -> list[tuple[str, int]]:
        edges = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
        return list(zip(edges, np.cumsum(self.counts).tolist()))


@dataclass
class EngineFigures:
    """One engine core's figures: gauges from its stats, counters and histograms as totals."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    gpu_idle: float = math.nan
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    preemptions: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    gpu_busy: float = 0.0
    gpu_gaps: float = 0.0
    spec_drafts: float = 0.0
    spec_draft_tokens: float = 0.0
    spec_accepted: float = 0.0
    success: dict[str, float] = field(default_factory=dict)  # finish reason -> count
    ttft: BatchHistogram = field(default_factory=lambda: BatchHistogram(TTFT_BUCKETS))
    itl: BatchHistogram = field(default_factory=lambda: BatchHistogram(ITL_BUCKETS))
    e2e: BatchHistogram = field(default_factory=lambda: BatchHistogram(REQUEST_BUCKETS))
    queue_time: BatchHistogram = field(default_factory=lambda: BatchHistogram(REQUEST_BUCKETS))
    request_prompt_tokens: BatchHistogram = field(default_factory=lambda: BatchHistogram(TOKEN_BUCKETS))
    request_generation_tokens: BatchHistogram = field(default_factory=lambda: BatchHistogram(TOKEN_BUCKETS))
    cache_config: dict[str, str] = field(default_factory=dict)  # vLLM's cache_config_info labels


@dataclass(frozen=True)
class Spec:
    """One metric: its name after the prefix, kind, help, the ``EngineFigures`` field it shows, and
    whether vLLM has it (then it takes the chosen prefixes; else only ``tandem:``)."""

    name: str
    kind: str  # "gauge", "counter" (name without _total), "histogram"
    doc: str
    field: str
    vllm: bool = True
    vllm_aliases: tuple[str, ...] = ()  # vLLM's older names, under vllm: only


SPECS = (
    Spec("num_requests_running", "gauge", "Requests in the engine's running batch.", "running"),
    Spec("num_requests_waiting", "gauge", "Requests waiting for a place in the batch.", "waiting"),
    Spec("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).", "kv_usage",
         vllm_aliases=("gpu_cache_usage_perc",)),
    Spec("gpu_idle_fraction", "gauge", "Fraction of time the device sat idle between the core's most recent steps "
                                       "while it had work (NaN before two steps ran).", "gpu_idle", vllm=False),
    Spec("prompt_tokens", "counter", "Prompt tokens of the engine requests added.", "prompt_tokens"),
    Spec("generation_tokens", "counter", "Tokens generated.", "generation_tokens"),
    Spec("num_preemptions", "counter", "Sequences preempted (their KV blocks freed, recomputed).", "preemptions"),
    Spec("prefix_cache_queries", "counter", "Tokens of admitted requests looked up in the prefix cache.",
         "prefix_queries"),
    Spec("prefix_cache_hits", "counter", "Tokens found in the prefix cache (not computed); hit rate = hits / "
                                         "queries.", "prefix_hits"),
    Spec("gpu_busy_seconds", "counter", "Device time spent in the core's steps.", "gpu_busy", vllm=False),
    Spec("gpu_idle_seconds", "counter", "Device time between the core's steps while it had work (idle fraction "
                                        "over a window = its increase over both's).", "gpu_gaps", vllm=False),
    Spec("spec_decode_num_drafts", "counter", "Sequence-steps that verified speculative proposals.", "spec_drafts"),
    Spec("spec_decode_num_draft_tokens", "counter", "Speculative proposals verified.", "spec_draft_tokens"),
    Spec("spec_decode_num_accepted_tokens", "counter", "Speculative proposals accepted.", "spec_accepted"),
    Spec("request_success", "counter", "Engine requests finished, by finish reason.", "success"),
    Spec("time_to_first_token_seconds", "histogram", "Arrival to first token.", "ttft"),
    Spec("inter_token_latency_seconds", "histogram", "Time between a request's successive tokens.", "itl",
         vllm_aliases=("time_per_output_token_seconds",)),
    Spec("e2e_request_latency_seconds", "histogram", "Arrival to the last token.", "e2e"),
    Spec("request_queue_time_seconds", "histogram", "Arrival in the engine core to first scheduled.", "queue_time"),
    Spec("request_prompt_tokens", "histogram", "Prompt tokens per finished engine request.",
         "request_prompt_tokens"),
    Spec("request_generation_tokens", "histogram", "Generated tokens per finished engine request.",
         "request_generation_tokens"),
)
_TOTALS = ("preemptions", "prefix_queries", "prefix_hits", "gpu_busy", "gpu_gaps", "spec_drafts", "spec_draft_tokens",
           "spec_accepted")  # the core sends running totals


def metric_prefixes(choice: str) -> tuple[str, ...]:
    if choice not in METRICS_PREFIXES:
        raise ValueError(f"--metrics-prefix must be one of {', '.join(METRICS_PREFIXES)}, not {choice!r}")
    return ("tandem:", "vllm:") if choice == "both" else (choice + ":",)


class _Collector:
    """Builds every family from the figures when scraped."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        self.engines, self.open = self.m.snapshot()
        for spec in SPECS:
            names = [p + spec.name for p in self.m.prefixes] if spec.vllm else ["tandem:" + spec.name]
            if spec.vllm and "vllm:" in self.m.prefixes:
                names += ["vllm:" + alias for alias in spec.vllm_aliases]
            for name in names:
                yield self._family(spec, name)
        yield from self._cache_info()
        yield from self._api_gauges()

    def _family(self, spec: Spec, name: str) -> Metric:
        labels = ["model_name", "engine"]
        model = self.m.model_name
        if spec.kind == "gauge":
            family = GaugeMetricFamily(name, spec.doc, labels=labels)
        elif spec.kind == "counter":
            family = CounterMetricFamily(name, spec.doc, labels=labels + (["finished_reason"] if spec.field ==
                                                                          "success" else []))
        else:
            family = HistogramMetricFamily(name, spec.doc, labels=labels)
        for engine, figures in enumerate(self.engines):
            value = getattr(figures, spec.field)
            if spec.kind == "histogram":
                family.add_metric([model, str(engine)], buckets=value.buckets(), sum_value=value.total)
            elif spec.field == "success":
                for reason, count in sorted(value.items()):
                    family.add_metric([model, str(engine), reason], count)
            else:
                family.add_metric([model, str(engine)], value)
        return family

    def _cache_info(self) -> Iterator[Metric]:
        """vLLM's ``cache_config_info`` (value 1; the labels carry it): the Gateway API Inference
        Extension's prefix-aware picker reads ``block_size`` and ``num_gpu_blocks`` from it."""
        if "vllm:" not in self.m.prefixes:
            return
        for engine, figures in enumerate(self.engines):
            if figures.cache_config:
                info = dict(figures.cache_config, engine=str(engine))
                family = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache.",
                                           labels=list(info))
                family.add_metric(list(info.values()), 1.0)
                yield family

    def _api_gauges(self) -> Iterator[Metric]:
        """Ours: the API process's per-request state, which must return to 0 when no request is open."""
        for name, doc, value in (
                ("api_open_requests", "Engine requests the API processes route outputs for.", self.open[0]),
                ("api_output_states", "Engine requests whose text the API processes track.", self.open[1])):
            family = GaugeMetricFamily("tandem:" + name, doc, labels=["model_name"])
            family.add_metric([self.m.model_name], value)
            yield family


class ServerMetrics:
    def __init__(self, model_name: str, prefix: str = DEFAULT_METRICS_PREFIX, num_engines: int = 1) -> None:
        self.model_name = model_name
        self.shared: SharedFigures | None = None
        self.prefixes = metric_prefixes(prefix)
        self.engines = [EngineFigures() for _ in range(num_engines)]
        self.open_routes = 0
        self.open_outputs = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # type: ignore[arg-type]
        self._seen = [dict.fromkeys(_TOTALS, 0.0) for _ in range(num_engines)]  # core totals already counted

    def share(self, shared: SharedFigures) -> None:
        """Pool the per-request figures with the other API processes (``--api-server-count``)."""
        self.shared = shared
        shared.start(self)

    def on_ready(self, engine: int, block_size: int, num_gpu_blocks: int, prefix_caching: bool | None = None) -> None:
        info = {"block_size": str(block_size), "num_gpu_blocks": str(num_gpu_blocks)}
        if prefix_caching is not None:
            info["enable_prefix_caching"] = str(prefix_caching)
        self.engines[engine].cache_config = info

    def on_stats(self, stats: Stats, engine: int = 0) -> None:
        figures = self.engines[engine]
        figures.running = stats.num_running
        figures.waiting = stats.num_waiting
        figures.kv_usage = stats.kv_usage
        figures.gpu_idle = math.nan if stats.gpu_idle_fraction is None else stats.gpu_idle_fraction
        seen = self._seen[engine]
        for name, total in (("preemptions", stats.num_preemptions), ("prefix_queries", stats.prefix_cache_queries),
                            ("prefix_hits", stats.prefix_cache_hits), ("gpu_busy", stats.gpu_busy_s),
                            ("gpu_gaps", stats.gpu_idle_s), ("spec_drafts", stats.spec_num_drafts),
                            ("spec_draft_tokens", stats.spec_num_draft_tokens),
                            ("spec_accepted", stats.spec_num_accepted_tokens)):
            if total > seen[name]:  # a counter only grows, whatever order the totals arrive in
                setattr(figures, name, getattr(figures, name) + total - seen[name])
                seen[name] = total

    def on_prompt_tokens(self, count: int, engine: int = 0) -> None:
        self.engines[engine].prompt_tokens += count

    def on_open_requests(self, routes: int, output_states: int) -> None:
        self.open_routes = routes
        self.open_outputs = output_states

    def on_step(self, num_tokens: int, ttfts: list[float], itls: list[float], queue_times: list[float],
                engine: int = 0) -> None:
        figures = self.engines[engine]
        figures.generation_tokens += num_tokens
        figures.ttft.observe_many(ttfts)
        figures.itl.observe_many(itls)
        figures.queue_time.observe_many(queue_times)

    def on_finished(self, reason: str, e2e_seconds: float, engine: int = 0, prompt_tokens: int | None = None,
                    generation_tokens: int | None = None) -> None:
        figures = self.engines[engine]
        figures.success[reason] = figures.success.get(reason, 0.0) + 1
        figures.e2e.observe_many([e2e_seconds])
        if prompt_tokens is not None:
            figures.request_prompt_tokens.observe_many([prompt_tokens])
        if generation_tokens is not None:
            figures.request_generation_tokens.observe_many([generation_tokens])

    def snapshot(self) -> tuple[list[EngineFigures], tuple[float, float]]:
        """What a scrape shows: this process's figures, plus the other API processes' own ones."""
        if self.shared is None:
            return self.engines, (self.open_routes, self.open_outputs)
        self.shared.publish(self)
        engines = [copy.deepcopy(f) for f in self.engines]
        routes, outputs = float(self.open_routes), float(self.open_outputs)
        for other in self.shared.others():
            for figures, theirs in zip(engines, other["engines"]):
                add_shared(figures, theirs)
            routes, outputs = routes + other["open"][0], outputs + other["open"][1]
        return engines, (routes, outputs)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# per-request figures only the API process that served a request knows; the rest (the cores' stats,
# generated tokens, queue times) reach every API process alike
SHARED_FIELDS = ("prompt_tokens", "success", "ttft", "itl", "e2e", "request_prompt_tokens",
                 "request_generation_tokens")


def shared_part(figures: EngineFigures) -> dict:
    part = {}
    for name in SHARED_FIELDS:
        value = getattr(figures, name)
        part[name] = [value.counts.tolist(), value.total] if isinstance(value, BatchHistogram) else value
    return part


def add_shared(figures: EngineFigures, part: dict) -> None:
    for name in SHARED_FIELDS:
        value, theirs = getattr(figures, name), part[name]
        if isinstance(value, BatchHistogram):
            value.counts = value.counts + np.asarray(theirs[0], dtype=np.int64)
            value.total += theirs[1]
        elif isinstance(value, dict):
            for key, count in theirs.items():
                value[key] = value.get(key, 0.0) + count
        else:
            setattr(figures, name, value + theirs)


class SharedFigures:
    """The API processes' own figures, one small file each in a private folder: each process writes
    its own every ``PUBLISH_INTERVAL_S`` (and when scraped), a scrape adds the others' latest, so
    every process answers /metrics alike (others' figures at most that old; counters never go back:
    each file only grows)."""

    PUBLISH_INTERVAL_S = 1.0

    def __init__(self, folder: str, index: int, count: int) -> None:
        self.folder, self.index, self.count = folder, index, count
        self.lock = threading.Lock()

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"api-{index}.msgpack")

    def start(self, metrics: ServerMetrics) -> None:
        def loop() -> None:
            while True:
                time.sleep(self.PUBLISH_INTERVAL_S)
                self.publish(metrics)

        threading.Thread(target=loop, name="tandem-metrics-share", daemon=True).start()

    def publish(self, metrics: ServerMetrics) -> None:
        frame = msgspec.msgpack.encode({"engines": [shared_part(f) for f in metrics.engines],
                                        "open": [metrics.open_routes, metrics.open_outputs]})
        with self.lock:
            temporary = self._path(self.index) + ".tmp"
            with open(temporary, "wb") as out:
                out.write(frame)
            os.replace(temporary, self._path(self.index))  # readers see the old file or the new one

    def others(self) -> list[dict]:
        found = []
        for index in range(self.count):
            if index != self.index:
                try:
                    with open(self._path(index), "rb") as src:
                        found.append(msgspec.msgpack.decode(src.read()))
                except FileNotFoundError:
                    pass  # not published yet
        return found
