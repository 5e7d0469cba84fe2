"""``tandem bench-serve`` against the test server: exact token counts, latencies, the GPU idle fraction."""
import json

from server_utils import SERVER_KEY
from tandem.cli import main


def test_bench_serve_reports_throughput_latencies_and_idle_fraction(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-serve", "--url", server.url, "--api-key", SERVER_KEY, "--num-clients", "4",
                 "--num-requests", "6", "--prompt-len", "16", "--max-tokens", "24", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "TTFT p50" in printed and "GPU idle fraction" in printed
    report = json.loads(out.read_text())
    assert report["num_errors"] == 0 and report["output_tokens"] == 6 * 24 and report["model"] == "tiny"
    assert report["output_tok_per_s"] > 0 and report["ttft"]["p50_ms"] > 0 and report["tpot"]["p99_ms"] > 0
    assert 0.0 <= report["gpu_idle_fraction"]["at_end"] <= 1.0
    assert 0.0 <= report["gpu_idle_fraction"]["run"] < 1.0  # from the device-time counters


def test_bench_serve_errors_exit_2(server, capsys):
    assert main(["bench-serve", "--url", server.url, "--api-key", "wrong", "--num-clients", "1"]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    assert main(["bench-serve", "--url", server.url, "--api-key", SERVER_KEY, "--model", "other"]) == 2
    assert "does not serve 'other'" in capsys.readouterr().err


def test_the_report_says_how_many_sequences_the_server_ran():
    from tandem.server.bench import BenchServeConfig, RequestResult, format_report, summarise

    cfg = BenchServeConfig(num_clients=256)
    results = [RequestResult(ttft=0.05, latency=1.0, output_tokens=8) for _ in range(3)]
    report = summarise(cfg, results, 2.0, {"idle": [0.01, 0.02], "running": [250.0, 190.0], "waiting": [0.0, 3.0]},
                       0.01)
    assert report["server_sequences"] == {"running": {"mean": 220.0, "min": 190.0},
                                          "waiting": {"mean": 1.5, "min": 0.0}}
    report.update(model="m")
    assert "running mean 220.0, min 190 (clients 256); waiting mean 1.5" in format_report(report)
    quiet = summarise(cfg, results, 2.0, {"idle": [], "running": [], "waiting": []}, None)
    assert quiet["server_sequences"] == {} and "server sequences" not in format_report(dict(quiet, model="m"))
