"""`tandem bench` on a CPU (issue 26, acceptance 4): the simulated GPU shows the overlap async
batching buys, five runs in a row agree, the measured step times are the cited ones, the table fits
100 columns and preemptions are explained."""
import json
from pathlib import Path

import pytest

from tandem.bench.step_time import STEP_TIME_MODELS
from tandem.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
#: a workload of the default's shape, smaller (the default's 32 sequences take 5 x 2 x 0.5 s of CPU); long
#: enough that the host's work before the first step and after the last stays small next to the run
SMALL = ["--num-requests", "16", "--prompt-len", "64", "--max-tokens", "512"]


def test_simulated_gpu_five_runs_agree_and_async_idles_less(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["bench", *SMALL, "--simulated-device", "only", "--runs", "5", "--no-progress",
                 "--json", str(out)]) == 0
    sim = json.loads(out.read_text())["simulated"]
    spread = sim["spread"]
    for mode in ("sync", "async"):
        lo, med, hi = spread[mode]["wall_s"]
        assert hi <= 1.2 * lo, f"{mode}: wall times {spread[mode]['wall_s']} disagree by more than 20%"
    assert spread["async_over_sync_wall"][2] < 1  # async faster in every run
    # the host's gaps between steps: in sync between every two steps, in async hidden behind them
    assert spread["async"]["gpu_idle_fraction"][2] < spread["sync"]["gpu_idle_fraction"][0]
    assert sim["modes"]["sync"]["gpu_idle_fraction"] > 0.03
    assert sim["modes"]["sync"]["num_steps"] == sim["modes"]["async"]["num_steps"] >= 512
    for mode in sim["modes"].values():  # the run's (virtual) time: the device's span (busy over not idle),
        busy = mode["mean_gpu_ms"] * mode["num_steps"] / 1e3  # and the host's work before the first step
        span = busy / (1 - mode["gpu_idle_fraction"])  # and after the last
        assert span <= mode["wall_s"] <= span + 0.1
    text = capsys.readouterr().out
    assert "async/sync wall time:" in text and "H100" in text and "median [min-max]" in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_simulated_step_times_are_the_cited_measurements():
    """Every decode point is a measured step of the file it names; the prefill cost is that run's GPU
    busy time less its decode steps', per prefill token."""
    for clock in STEP_TIME_MODELS.values():
        for p in clock.points:
            data = json.loads((RESULTS / p.source).read_text())
            checks = [m["decode_step_check"] for m in data["modes"].values()]
            assert any(c["kv_tokens"] == p.kv_tokens and c["measured_gpu_ms"] == pytest.approx(p.ms, abs=5e-4)
                       for c in checks), p
            assert data["model"] == clock.model and data["device"] == clock.device
        data = json.loads((RESULTS / clock.prefill_source).read_text())
        run = data["modes"]["async"]
        prefill_steps = -(-run["prefill_tokens_computed"] // data["max_num_batched_tokens"])
        decode_ms = (run["num_steps"] - prefill_steps) * run["decode_step_check"]["measured_gpu_ms"]
        per_token = (run["mean_gpu_ms"] * run["num_steps"] - decode_ms) / run["prefill_tokens_computed"]
        assert clock.prefill_ms_per_token == pytest.approx(per_token, rel=0.01)
        # between two points: on the line through them; a prefill adds its tokens' cost
        a, b = clock.points[:2]
        mid = (a.kv_tokens + b.kv_tokens) // 2
        assert clock.decode_ms(mid) == pytest.approx((a.ms + b.ms) / 2, rel=1e-3)
        assert clock.step_ms(1000 + 8, 8, mid) == pytest.approx(clock.decode_ms(mid) + 1000 * clock.prefill_ms_per_token)


def test_the_default_cpu_bench_runs_the_tested_path(monkeypatch):
    """`tandem bench` with no arguments on a CPU: the real run, then the simulated GPU with the
    default workload and 5 runs: the path the test above runs on a smaller workload."""
    import torch

    from tandem.bench import api

    calls = {}

    def real(model, w, modes, runs, *rest):
        calls["real"] = (model, runs)
        return {"device_type": "cpu"}

    class Stop(Exception):
        pass

    def simulate(model, w, modes, runs, **options):
        calls["sim"] = (model, w.describe(), modes, runs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(api, "_real_bench", real)
    monkeypatch.setattr(api, "simulate", simulate)
    with pytest.raises(Stop):
        main(["bench"])
    assert calls["real"] == ("random:tiny", None)  # as many of 5 rounds as are fast enough
    assert calls["sim"] == ("random:llama3.2-1b", "32 requests x (256 prompt + 1024 new tokens)",
                            ["sync", "async"], 5)


def test_preemptions_are_counted_and_explained(capsys):
    # 4 requests x 64 tokens need 256 KV tokens at once; the cache holds 128
    assert main(["bench", "--model", "random:tiny", "--num-requests", "4", "--prompt-len", "16", "--max-tokens", "48",
                 "--kv-cache-tokens", "128", "--modes", "async", "--runs", "1", "--simulated-device", "off",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    said = " ".join(text[text.index("preemptions:"):].splitlines())
    count = int(said.split("async ")[1].split(":")[0])
    assert count > 0 and "need up to 256 KV tokens at once, the cache holds 128" in said
    assert "GPU idle" not in text and "roofline" not in text  # no GPU columns on a CPU
    assert all(len(line) <= 100 for line in text.splitlines())


def test_the_gpu_table_fits_100_columns_at_the_largest_figures():
    from tandem.bench.metrics import ModeResult
    from tandem.bench.report import anchor_text, table

    # each figure at the most digits a run of under 1000 s, 100 000 steps and 1M tok/s shows
    big = ModeResult(mode="async", wall_s=999.99, num_requests=4096, prompt_tokens=10**7, output_tokens=10**7,
                     num_steps=99999, num_preemptions=0, prefill_tokens_computed=10**7,
                     output_tok_per_s=999999.0, total_tok_per_s=2345678.0, mean_schedule_ms=12.345,
                     mean_build_ms=12.345, mean_submit_ms=123.456, mean_wait_ms=999.99, mean_process_ms=12.345,
                     mean_gpu_ms=999.99, gpu_idle_fraction=1.0, gpu_idle_fraction_decode=1.0, roofline_fraction=1.0)
    big.set_prefix_cache(100, 100)
    lines = table([big], gpu=True).splitlines()
    assert len(lines) == 2 and max(map(len, lines)) <= 100 and "GPU idle" in lines[0]
    assert "GPU" not in table([big], gpu=False)
    anchor = {"mode": "sdpa-cuda-graphs-async", "wall_s": 1234.5, "output_tok_per_s": 123456.0,
              "first_token_agreement": 0.97}
    assert len(anchor_text(anchor)) <= 100 and "97%" in anchor_text(anchor)
    assert len(anchor_text({"mode": "sdpa-eager", "error": "RuntimeError: " + "x" * 300})) <= 100


@pytest.mark.parametrize("argv, named", [
    (["--simulated-device", "only", "--dtype", "float64", "--compare-hf"], "--compare-hf, --dtype"),
    (["--host-only", "--runs", "3"], "--runs and --simulated-device do not apply to --host-only"),
    (["--runs", "0"], "runs and simulated_runs must be >= 1")])
def test_options_a_run_would_not_use_are_refused(argv, named, capsys):
    assert main(["bench", "--num-requests", "1", "--max-tokens", "2", *argv]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("name, model, n, new, seqs", [("M_llama3.2-1b_h100_755f55f", "random:llama3.2-1b", 256, 512, 256),
                                                       ("S_llama3-8b_h100_755f55f", "random:llama3-8b", 32, 1024, 32)])
def test_the_simulated_gpu_runs_workloads_m_and_s_as_long_as_the_h100(name, model, n, new, seqs):
    """Async hides the host, so the simulated async run lasts what the H100's did (its step times
    are the model's, its step count the engine's): within 5% of the measured wall time."""
    from tandem.bench.simulated import simulate
    from tandem.bench.workload import LengthRange, Workload

    measured = json.loads((RESULTS / f"2026-12-06_{name}.json").read_text())["modes"]["async"]
    sim = simulate(model, Workload(n, LengthRange(256, 256), LengthRange(new, new)), ["async"], 1,
                   max_num_seqs=seqs, max_model_len=256 + new)
    run = sim.by_mode["async"][0]
    assert run.num_steps == measured["num_steps"]
    assert run.wall_s == pytest.approx(measured["wall_s"], rel=0.05)
