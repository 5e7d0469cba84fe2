"""Prometheus metrics under vLLM's names with our prefix (``tandem:num_requests_running`` ...), plus
what only this engine measures: the GPU idle fraction over the core's most recent steps.

Latencies are collected per step, not per token: the API process receives one message per engine
step carrying every request's new token, so the histograms take a whole step's observations at
once (one numpy pass) instead of one locked ``observe`` call per token."""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from tandem.server.messages import Stats

PREFIX = "tandem:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class BatchHistogram:
    """A Prometheus histogram (a registry collector) that takes many observations per call."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], labels: dict[str, str]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one is +Inf
        self.total = 0.0
        self.labels = labels

    def observe_many(self, values: list[float]) -> None:
        if not values:
            return
        arr = np.asarray(values, dtype=np.float64)
        # the first bucket whose upper bound is >= the value ("le" semantics)
        self.counts += np.bincount(np.searchsorted(self.bounds, arr, side="left"), minlength=len(self.counts))
        self.total += float(arr.sum())

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        cumulative = np.cumsum(self.counts).tolist()
        edges = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
        family.add_metric(list(self.labels.values()), buckets=list(zip(edges, cumulative)), sum_value=self.total)
        yield family


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # no "_created" series next to every counter (as vLLM)
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}
        names = list(labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, names, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, names, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> BatchHistogram:
            h = BatchHistogram(PREFIX + name, doc, buckets, labels)
            self.registry.register(h)
            return h

        self.running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for a place in the batch.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).")
        self.gpu_idle = gauge("gpu_idle_fraction", "Fraction of time the device sat idle between the core's "
                                                   "most recent steps while it had work (NaN before two steps ran).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the engine requests added.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (their KV blocks freed, recomputed).")
        self.prefix_queries = counter("prefix_cache_queries", "Tokens of admitted requests looked up in the "
                                                              "prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Tokens found in the prefix cache (not computed); hit "
                                                        "rate = hits / queries.")
        self.gpu_busy = counter("gpu_busy_seconds", "Device time spent in the core's steps.")
        self.gpu_gaps = counter("gpu_idle_seconds", "Device time between the core's steps while it had work "
                                                    "(idle fraction over a window = its increase over both's).")
        # ours: the API process's per-request state, which must return to 0 when no request is open
        self.open_routes = gauge("api_open_requests", "Engine requests the API process routes outputs for.")
        self.open_outputs = gauge("api_output_states", "Engine requests whose text the API process tracks.")
        self._success = Counter(PREFIX + "request_success", "Engine requests finished, by finish reason.",
                                names + ["finished_reason"], registry=self.registry)
        self._labels = labels
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's successive tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the last token.", REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival in the engine core to first "
                                                                  "scheduled.", REQUEST_BUCKETS)
        # core totals already counted
        self._seen: dict[str, float] = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0, "gpu_busy": 0.0,
                                        "gpu_gaps": 0.0}
        self.gpu_idle.set(math.nan)

    def on_stats(self, stats: Stats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.gpu_idle.set(math.nan if stats.gpu_idle_fraction is None else stats.gpu_idle_fraction)
        self._add_total("preemptions", stats.num_preemptions)
        self._add_total("prefix_queries", stats.prefix_cache_queries)
        self._add_total("prefix_hits", stats.prefix_cache_hits)
        self._add_total("gpu_busy", stats.gpu_busy_s)
        self._add_total("gpu_gaps", stats.gpu_idle_s)

    def _add_total(self, name: str, total: float) -> None:
        """The core sends running totals; a Prometheus counter takes increments."""
        if total > self._seen[name]:
            getattr(self, name).inc(total - self._seen[name])
            self._seen[name] = total

    def on_open_requests(self, routes: int, output_states: int) -> None:
        self.open_routes.set(routes)
        self.open_outputs.set(output_states)

    def on_step(self, num_tokens: int, ttfts: list[float], itls: list[float], queue_times: list[float]) -> None:
        if num_tokens:
            self.generation_tokens.inc(num_tokens)
        self.ttft.observe_many(ttfts)
        self.itl.observe_many(itls)
        self.queue_time.observe_many(queue_times)

    def on_finished(self, reason: str, e2e_seconds: float) -> None:
        self._success.labels(finished_reason=reason, **self._labels).inc()
        self.e2e.observe_many([e2e_seconds])

    def render(self) -> bytes:
        return generate_latest(self.registry)
