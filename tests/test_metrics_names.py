"""/metrics under vLLM's names, types and labels (so vLLM's dashboards and the Gateway API Inference
Extension's endpoint picker read a tandem server unchanged), parsed with prometheus_client's own
parser: from the session's running server (default ``--metrics-prefix both``), and each prefix
choice on ``ServerMetrics`` directly."""
from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.server.messages import Stats
from tandem.server.metrics import ServerMetrics

# vLLM's documented metrics that tandem exports, with their types (counters without "_total", as the
# parser names families)
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",  # the older name, still the picker's default in some releases
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:request_success": "counter",
    "vllm:spec_decode_num_drafts": "counter",
    "vllm:spec_decode_num_draft_tokens": "counter",
    "vllm:spec_decode_num_accepted_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:cache_config_info": "gauge",
}
# the model-server protocol of the Gateway API Inference Extension: queued, running, KV utilisation
GATEWAY_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
OURS = ("tandem:gpu_idle_fraction", "tandem:gpu_busy_seconds", "tandem:gpu_idle_seconds",
        "tandem:api_open_requests", "tandem:api_output_states")


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family, sample_name: str, **labels: str) -> float:
    for sample in family.samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise KeyError(sample_name)


def test_served_metrics_have_vllm_names_types_and_labels(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True}
    headers = {"Authorization": "Bearer test-key"}
    assert httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60).status_code == 200
    families = _families(httpx.get(server.url + "/metrics", timeout=10).text)
    for name, kind in VLLM_METRICS.items():
        assert name in families, name
        assert families[name].type == kind, name
        for sample in families[name].samples:
            if name != "vllm:cache_config_info":
                assert sample.labels["model_name"] == "tiny", sample
            assert sample.labels["engine"] == "0", sample
    for name in GATEWAY_METRICS:
        assert families[name].type == "gauge"
    assert 0.0 <= _value(families["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc") <= 1.0
    info = families["vllm:cache_config_info"].samples[0]
    assert int(info.labels["block_size"]) > 0 and int(info.labels["num_gpu_blocks"]) > 0 and info.value == 1.0
    assert "vllm:lora_requests_info" not in families  # no LoRA adapters: nothing to report (docs/serving.md)
    # both prefixes (the default) show the same figures
    for name in ("generation_tokens", "prompt_tokens"):
        vllm = _value(families["vllm:" + name], f"vllm:{name}_total")
        assert vllm >= 5 and vllm == _value(families["tandem:" + name], f"tandem:{name}_total")
    assert _value(families["vllm:request_success"], "vllm:request_success_total", finished_reason="length") >= 1
    assert _value(families["vllm:e2e_request_latency_seconds"], "vllm:e2e_request_latency_seconds_count") >= 1
    assert _value(families["vllm:request_generation_tokens"], "vllm:request_generation_tokens_bucket",
                  le="5.0") >= 1
    for name in OURS:
        assert name in families, name


def _render(prefix: str, engines: int = 1) -> dict:
    metrics = ServerMetrics("m", prefix, engines)
    for engine in range(engines):
        metrics.on_ready(engine, 16, 100 + engine)
        metrics.on_stats(Stats(engine + 1, engine, 0.25 * (engine + 1), 0, None, 100, 40 * engine), engine)
    metrics.on_step(3, [0.05], [0.01, 0.02], [0.001], engine=engines - 1)
    return _families(metrics.render().decode())


def test_prefix_choice_names_only_what_it_says():
    vllm, tandem, both = _render("vllm"), _render("tandem"), _render("both")
    assert set(VLLM_METRICS) <= set(vllm) and not any(n.startswith("tandem:") and n not in OURS for n in vllm)
    assert not any(n.startswith("vllm:") for n in tandem)
    assert "tandem:num_requests_running" in tandem and "tandem:kv_cache_usage_perc" in tandem
    assert "tandem:gpu_cache_usage_perc" not in tandem  # vLLM's old aliases only under vllm:
    assert set(vllm) | set(tandem) == set(both)
    for families in (vllm, tandem):
        assert set(OURS) <= set(families)  # ours keep their own prefix whatever is chosen
    with pytest.raises(ValueError, match="--metrics-prefix"):
        ServerMetrics("m", "sglang")


def test_speculative_decoding_counters_take_the_cores_totals():
    metrics = ServerMetrics("m", "vllm")
    metrics.on_stats(Stats(0, 0, 0.0, 0, None, spec_num_drafts=4, spec_num_draft_tokens=12, spec_num_accepted_tokens=7))
    metrics.on_stats(Stats(0, 0, 0.0, 0, None, spec_num_drafts=6, spec_num_draft_tokens=18, spec_num_accepted_tokens=9))
    families = _families(metrics.render().decode())
    assert _value(families["vllm:spec_decode_num_drafts"], "vllm:spec_decode_num_drafts_total") == 6
    assert _value(families["vllm:spec_decode_num_draft_tokens"], "vllm:spec_decode_num_draft_tokens_total") == 18
    assert _value(families["vllm:spec_decode_num_accepted_tokens"],
                  "vllm:spec_decode_num_accepted_tokens_total") == 9


def test_one_series_per_engine_core():
    families = _render("vllm", engines=2)
    running = {s.labels["engine"]: s.value for s in families["vllm:num_requests_running"].samples}
    assert running == {"0": 1.0, "1": 2.0}
    hits = {s.labels["engine"]: s.value for s in families["vllm:prefix_cache_hits"].samples
            if s.name.endswith("_total")}
    assert hits == {"0": 0.0, "1": 40.0}
    blocks = {s.labels["engine"]: s.labels["num_gpu_blocks"] for s in families["vllm:cache_config_info"].samples}
    assert blocks == {"0": "100", "1": "101"}
    ttft = {s.labels["engine"]: s.value for s in families["vllm:time_to_first_token_seconds"].samples
            if s.name.endswith("_count")}
    assert ttft == {"0": 0.0, "1": 1.0}
    idle = [s.value for s in families["tandem:gpu_idle_fraction"].samples]
    assert len(idle) == 2 and all(math.isnan(v) for v in idle)


def test_api_processes_pool_their_own_figures(tmp_path):
    """Under --api-server-count, each process answers /metrics with every process's requests."""
    from tandem.server.metrics import SharedFigures

    first, second = ServerMetrics("m", "vllm"), ServerMetrics("m", "vllm")
    first.share(SharedFigures(str(tmp_path), 0, 2))
    second.share(SharedFigures(str(tmp_path), 1, 2))
    first.on_finished("stop", 0.2, prompt_tokens=7, generation_tokens=3)
    second.on_finished("length", 0.4, prompt_tokens=5, generation_tokens=9)
    second.on_prompt_tokens(5)
    second.on_stats(Stats(2, 1, 0.5, 0, None, 10, 4))  # the cores' figures reach both alike: not added
    second.render()  # publishes its own
    families = _families(first.render().decode())
    success = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples
               if s.name.endswith("_total")}
    assert success == {"stop": 1.0, "length": 1.0}
    assert _value(families["vllm:prompt_tokens"], "vllm:prompt_tokens_total") == 5
    assert _value(families["vllm:e2e_request_latency_seconds"], "vllm:e2e_request_latency_seconds_count") == 2
    assert _value(families["vllm:num_requests_running"], "vllm:num_requests_running") == 0  # first's own stats
    assert first.engines[0].success == {"stop": 1.0}  # pooling leaves its own figures alone
