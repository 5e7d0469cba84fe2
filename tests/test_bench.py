"""`tandem bench` runs on CPU (tiny preset, a few steps) and records every figure."""
import json

import pytest

from tandem.bench.metrics import decode_idle_fraction, idle_fraction
from tandem.cli import main
from tandem.contract.worker import StepInterval as Interval

MODE_FIELDS = {"wall_s", "output_tok_per_s", "total_tok_per_s", "num_steps", "mean_schedule_ms", "mean_build_ms",
               "mean_submit_ms", "mean_wait_ms", "mean_process_ms", "mean_gpu_ms", "gpu_idle_fraction",
               "gpu_idle_fraction_decode", "roofline_fraction", "floor_s", "decode_step_check", "output_tokens",
               "prefill_tokens_computed", "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate"}


def test_bench_cli_on_cpu_writes_every_field(tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["bench", "--model", "random:tiny", "--num-requests", "3", "--prompt-len", "12", "--max-tokens", "6",
               "--json", str(out), "--timeline", str(tmp_path / "t.png"), "--trace", str(tmp_path / "t.json"),
               "--compare-hf", "--no-progress", "--runs", "2", "--simulated-device", "on"])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("command", "date", "commit", "device", "model", "workload", "ceilings", "modes", "hf_anchor",
                "outputs_identical_across_modes", "spread", "simulated"):
        assert key in data
    assert set(data["modes"]) == {"sync", "async"}
    for mode in data["modes"].values():
        assert MODE_FIELDS <= set(mode)
        assert mode["output_tokens"] == 3 * 6 and mode["num_steps"] >= 6
        # on a CPU the worker thread's steps are the device lane: idle is measured, the roofline is not
        assert 0 <= mode["gpu_idle_fraction"] < 1 and mode["mean_gpu_ms"] > 0 and mode["roofline_fraction"] is None
    assert data["outputs_identical_across_modes"] is True
    for mode in ("sync", "async"):  # two runs each: [min, median, max]
        lo, med, hi = data["spread"][mode]["wall_s"]
        assert 0 < lo <= med <= hi
        assert data["simulated"]["modes"][mode]["output_tokens"] == 3 * 6
    assert data["simulated"]["runs"] == 2 and "H100" in data["simulated"]["step_times"]
    assert data["hf_anchor"][0]["output_tokens"] == 3 * 6
    assert (tmp_path / "t.png").stat().st_size > 0
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    text = capsys.readouterr().out
    assert "hf generate_batch sdpa-eager: " in text and "out tok/s" in text


@pytest.mark.parametrize("caching", [True, False])
def test_bench_shared_prefix_shows_the_prefill_saved(tmp_path, caching):
    out = tmp_path / "run.json"
    flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
    assert main(["bench", "--num-requests", "4", "--prompt-len", "40", "--shared-prefix-len", "32", "--max-tokens",
                 "3", "--block-size", "16", "--modes", "sync", flag, "--json", str(out), "--no-progress", "--runs", "1",
                 "--simulated-device", "off"]) == 0
    data = json.loads(out.read_text())
    assert data["workload"]["shared_prefix_len"] == 32 and data["prefix_caching"] is caching
    mode = data["modes"]["sync"]
    if caching:  # every mode starts cold: the first request computes its prompt, the others 8 tokens each
        assert (mode["prefix_cache_queries"], mode["prefix_cache_hits"]) == (160, 96)
        assert mode["prefix_cache_hit_rate"] == pytest.approx(0.6) and mode["prefill_tokens_computed"] == 40 + 3 * 8
    else:
        assert mode["prefix_cache_hit_rate"] is None and mode["prefill_tokens_computed"] == 160


def test_bench_rejects_unknown_modes(capsys):
    assert main(["bench", "--modes", "sync,turbo", "--max-tokens", "2", "--num-requests", "1"]) == 2
    assert "modes" in capsys.readouterr().err


def test_idle_fraction_counts_gaps_between_steps():
    steps = [Interval(0, 0.0, 1.0), Interval(1, 1.5, 2.5), Interval(2, 2.5, 4.0)]
    assert idle_fraction(steps) == pytest.approx(0.5 / 4.0)


def test_decode_idle_fraction_ignores_prefill_steps():
    class Rec:
        def __init__(self, decode, seqs):
            self.num_decode, self.num_seqs = decode, seqs

    steps = [Interval(0, 0.0, 1.0), Interval(1, 3.0, 4.0), Interval(2, 4.5, 5.5)]
    records = {0: Rec(0, 2), 1: Rec(2, 2), 2: Rec(2, 2)}
    assert decode_idle_fraction(steps, records) == pytest.approx(0.5 / 1.5)


def test_floor_model_counts_weights_once_and_kv_per_token():
    import torch

    from tandem.bench.roofline import Ceilings, FloorModel
    from tandem.bench.step_log import StepRecord
    from tandem.model.presets import preset_config

    cfg = preset_config("random:llama3-8b")
    floor = FloorModel(cfg, torch.bfloat16)
    rec = StepRecord(0, num_tokens=32, num_seqs=32, num_decode=32, num_sampled=32, kv_tokens=32 * 1000,
                     attn_pairs=32 * 1000, t_begin=0, schedule_s=0, build_s=0, submit_s=0)
    cost = floor.step_cost(rec)
    weights = 8_030_261_248  # Llama-3-8B's parameter count; the embedding table is read for 32 rows only
    kv_per_token = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16 bytes
    expected = (weights - 128256 * 4096 + 32 * 4096) * 2 + (32 * 1000 + 32) * kv_per_token
    assert cost.bytes == pytest.approx(expected, rel=1e-9)
    c = Ceilings(copy_bytes_per_s=3e12, gemm_flops_per_s=8e14)
    assert cost.floor_s(c) == pytest.approx(expected / 3e12)  # decode at batch 32 is memory bound


def test_cpu_async_gives_the_worker_the_threads_and_the_host_one():
    import torch

    from tandem.llm import LLM

    before = torch.get_num_threads()
    llm = LLM("random:tiny", device="cpu", kv_cache_tokens=256, async_batching=True)
    executor = llm.engine.worker._executor
    worker_threads = executor._worker.submit(torch.get_num_threads).result()
    assert worker_threads == before and torch.get_num_threads() == 1
    llm.engine.core.set_async(False)  # the sync executor computes on the host thread again
    assert torch.get_num_threads() == before


def test_bench_prints_a_header_and_counts_tokens_in_its_progress_bar(capsys):
    assert main(["bench", "--model", "random:tiny", "--num-requests", "2", "--prompt-len", "5", "--max-tokens", "7",
                 "--modes", "async", "--runs", "1", "--simulated-device", "off"]) == 0
    out, err = capsys.readouterr()
    assert "tandem bench: random:tiny on cpu" in out and "torch threads" in out and "2 requests x (5 prompt" in out
    assert "14/14" in err and "tok" in err  # 2 requests x 7 tokens


def test_length_ranges_and_poisson_arrivals(tmp_path):
    from tandem.bench.workload import LengthRange, Workload, make_requests

    out = tmp_path / "ranges.json"
    assert main(["bench", "--model", "random:tiny", "--num-requests", "12", "--prompt-len", "3:40", "--max-tokens",
                 "2:9", "--request-rate", "400", "--json", str(out), "--no-progress", "--runs", "1",
                 "--simulated-device", "off"]) == 0
    data = json.loads(out.read_text())
    assert data["workload"]["prompt_len"] == "3:40" and data["workload"]["max_tokens"] == "2:9"
    assert data["workload"]["request_rate"] == 400 and data["outputs_identical_across_modes"]
    reqs = make_requests(Workload(12, LengthRange(3, 40), LengthRange(2, 9), request_rate=400.0), 512)
    assert {len(r.prompt) for r in reqs} <= set(range(3, 41)) and len({len(r.prompt) for r in reqs}) > 3
    assert data["modes"]["async"]["output_tokens"] == sum(r.max_tokens for r in reqs)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and 0 < arrivals[-1] < 1.0  # ~12 / 400 s


@pytest.mark.parametrize("spec", ["0", "5:3", "a:b", "1:2:3", ""])
def test_bad_length_specs_are_refused(spec):
    from tandem.bench.workload import LengthRange

    with pytest.raises(ValueError, match="MIN:MAX"):
        LengthRange.parse(spec)


def test_host_only_benchmark_runs_the_real_loop_without_a_device(capsys):
    assert main(["bench", "--host-only", "--model", "random:tiny", "--host-batch-sizes", "8,32", "--prompt-len", "16",
                 "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("8", "32")]
    assert [r[0] for r in rows] == ["8", "32"]
    assert all(int(r[1]) >= 8 and float(r[6]) > 0 for r in rows)  # pure-decode steps measured, host time > 0


def test_host_only_over_real_traffic_reports_the_tail_of_mixed_and_decode_steps(capsys):
    """Length ranges: requests of every length through the real loop, a KV cache short enough to
    preempt; each phase's p50 / p99 / max for mixed and pure-decode steps."""
    from tandem.bench.host_traffic import measure_traffic
    from tandem.bench.workload import LengthRange, Workload

    assert main(["bench", "--host-only", "--model", "random:tiny", "--num-requests", "24", "--prompt-len", "4:60",
                 "--max-tokens", "2:30", "--max-num-seqs", "8", "--kv-cache-tokens", "160"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["mixed"], ["decode"])}
    assert set(rows) == {"mixed", "decode"} and all(int(r[0]) > 0 for r in rows.values())
    f = measure_traffic("random:tiny", Workload(24, LengthRange(4, 60), LengthRange(2, 30)), max_num_seqs=8,
                        kv_cache_tokens=160, max_model_len=90)
    assert f["preemptions"] > 0 and f["mixed"]["steps"] + f["decode"]["steps"] > 24
    for kind in ("mixed", "decode"):
        for phase in ("schedule", "build", "process"):
            p50, p99, top = f[kind][phase]
            assert 0 < p50 <= p99 <= top


def test_host_only_traffic_refuses_a_kv_cache_its_lengths_cannot_fit(capsys):
    """As the real worker does: an explicit (here, derived) max_model_len above the KV cache is an
    error, not a loop waiting forever for blocks that cannot come."""
    assert main(["bench", "--host-only", "--model", "random:tiny", "--num-requests", "4", "--prompt-len", "4:50",
                 "--max-tokens", "2:20", "--kv-cache-tokens", "16"]) == 2
    assert "does not fit the KV cache" in capsys.readouterr().err


def test_repeat_span_prompts_for_ngram_speculation(tmp_path):
    from tandem.bench.workload import LengthRange, Workload, make_requests

    reqs = make_requests(Workload(3, LengthRange(20, 20), LengthRange(4, 4), repeat_span=6), 512)
    for r in reqs:
        assert len(r.prompt) == 20 and r.prompt == (r.prompt[:6] * 4)[:20] and len(set(r.prompt[:6])) > 1
    with pytest.raises(ValueError, match="repeat_span"):
        Workload(3, LengthRange(5, 9), LengthRange(4, 4), repeat_span=6)
    out = tmp_path / "ngram.json"
    assert main(["bench", "--model", "random:tiny", "--num-requests", "4", "--prompt-len", "48", "--max-tokens", "16",
                 "--repeat-span", "8", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                 "--json", str(out), "--no-progress", "--runs", "1", "--simulated-device", "off"]) == 0
    data = json.loads(out.read_text())
    assert data["workload"]["repeat_span"] == 8 and data["outputs_identical_across_modes"]
    # speculation ran in both modes (a random model seldom continues the span, so proposals are few)
    assert all(data["modes"][m]["spec_draft_tokens"] is not None for m in ("sync", "async"))
