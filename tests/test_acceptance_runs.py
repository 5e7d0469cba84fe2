"""The GPU acceptance runner (``scripts/acceptance_runs.py``) runs on an H100 elsewhere; here its
plans run in their ``--tiny`` shape on the CPU, a real server included, and its table is checked."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "acceptance_runs.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--tiny", "--port", str(_free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_offline_and_served_plans_run_and_fill_the_table(tmp_path):
    done = _run(tmp_path, "--plans", "long,serve")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["M_len131072", "offline_64", "offline_256", "serve_64_a",
                                                   "serve_64_b", "serve_256_a", "serve_256_b"]
    assert all("sync == async: True" in line for line in lines[:3])
    assert all(" tok/s" in line and "errors 0" in line for line in lines[3:])
    log = (tmp_path / "log.txt").read_text()
    assert log.count("rc=0") == 7 and "server exit status 0" in log
    # the offline run of the serve plan ends before its server starts (beside it, the GPU's memory is taken)
    assert log.index("(background)") > log.rindex("bench --model random:tiny --num-requests 8")
    assert (tmp_path / "summary.txt").read_text().splitlines() == lines


def test_a_deadline_skips_what_would_start_late(tmp_path):
    done = _run(tmp_path, "--plans", "offline,serve", "--deadline-s", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.endswith("skipped (deadline or no server)") for line in done.stdout.splitlines())
    assert "###" not in (tmp_path / "log.txt").read_text()


def test_an_unknown_plan_is_refused(tmp_path):
    done = _run(tmp_path, "--plans", "offline,nonsense")
    assert done.returncode == 2 and "unknown plan(s) nonsense" in done.stderr


def test_a_failed_run_is_marked_failed(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("acceptance_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    run = module.plans(tiny=True)["offline"][0]
    assert "FAILED" in module.summary_row(run, 1, tmp_path)
    assert "FAILED" in module.summary_row(module.plans(tiny=True)["checks"][0], 3, tmp_path)
    assert "skipped" in module.summary_row(run, None, tmp_path)


def test_the_structured_seam_and_moe_plans_run(tmp_path):
    done = _run(tmp_path, "--plans", "structured,seam,moe")
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert names == ["M_json", "M_json", "M_free", "G1", "G1", "G4", "G4", "TB_native", "TB", "TB", "Q30", "Q30", "Q30_fp8"]
    assert done.stdout.count("sync == async: True") == 8
    log = (tmp_path / "log.txt").read_text()
    assert "--structured-output json" in log and "--model-impl transformers" in log and "qwen3-moe" in log
    assert "--quantization fp8" in log


def test_the_spec_and_quant_plans_run(tmp_path):
    done = _run(tmp_path, "--plans", "spec,quant")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["b1_none", "b1_draft", "b1_rep_none", "b1_rep_ngram", "b8_none", "b8_draft", "b8_rep_none",
                     "b8_rep_ngram", "b1_bf16", "b1_int4", "S_bf16", "S_fp8"]
    speculating = [line for line in lines if "_draft" in line or "_ngram" in line]
    assert len(speculating) == 4 and all("accepted" in line and "tokens/step" in line for line in speculating)
    log = (tmp_path / "log.txt").read_text()
    assert "--repeat-span 16" in log and "--quantization int4" in log and "--quantization fp8" in log


def test_the_seed_batch_one_and_chat_plans_run(tmp_path):
    done = _run(tmp_path, "--plans", "seed,b1,chat")
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert names == ["seed", "seed_kv_fp8", "seed_kv_fp8_w_fp8", "b1_1b", "b1_8b", "chat_1b", "chat_8b"]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("--kv-cache-dtype fp8") == 2 and "--temperature 0.8" in log and "--prompt-len 16:16" in log


def test_the_gemv_plan_is_the_batch_one_plan_with_the_gemv_off_and_on():
    from benchmarks.acceptance_runs import plans

    table = plans(tiny=True)
    runs = table["gemv"]
    assert [r.name for r in runs] == ["b1_1b_gemv0", "b1_1b_gemv1", "b1_8b_gemv0", "b1_8b_gemv1"]
    assert [r.env for r in runs] == [{"TANDEM_GEMV": v} for v in "0101"]
    assert [r.argv for r in runs[::2]] == [r.argv for r in table["b1"]]


def test_a_runs_environment_reaches_it_and_is_logged_with_its_command(tmp_path):
    from benchmarks.acceptance_runs import Run, execute

    probe = Run("probe", [sys.executable, "-c", "import os; print('seen', os.environ['TANDEM_GEMV'])"],
                {"TANDEM_GEMV": "1"}, "check")
    with open(tmp_path / "log.txt", "w") as log:
        assert execute(probe, tmp_path, log, None) == 0
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith(f"### TANDEM_GEMV=1 {sys.executable} -c") and "seen 1" in text


def test_the_serve_plans_with_an_interval_run_and_four_api_processes_with_the_ramp(tmp_path):
    done = _run(tmp_path, "--plans", "serve_si8,serve_api4_ramp")
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines()]
    served = [f"serve_{c}_a_{plan}" for plan in ("si8", "api4_ramp") for c in (64, 256)]
    assert names == served
    assert all((tmp_path / f"{name}.json").is_file() for name in served)  # one file each, none overwritten
    assert all("errors 0" in line for line in done.stdout.splitlines())
    log = (tmp_path / "log.txt").read_text()
    assert "--api-server-count 4" in log and "--stream-interval 8" in log
    assert log.count("TANDEM_ADMIT_RAMP=1 ") == 1  # the ramp plan's server, and only its
    for plan in ("serve_si8", "serve_api4_ramp"):  # each server's step gaps, written as it stopped
        assert json.loads((tmp_path / f"{plan}_server_steps.json").read_text())["steps"] > 0


def test_the_served_variants_share_the_serve_plans_runs_and_its_offline_baseline():
    from benchmarks.acceptance_runs import SERVER_OPTIONS, plans

    table = plans(tiny=False)
    assert [r.name for r in table["serve_offline"]] == ["offline_64", "offline_256"]
    assert all(r.kind == "bench" for r in table["serve_offline"])
    for plan in ("serve_api4", "serve_si8", "serve_api4_ramp"):
        assert [r.name for r in table[plan]] == [f"serve_64_a_{plan[6:]}", f"serve_256_a_{plan[6:]}"]
        assert [r.argv for r in table[plan]] == [r.argv for r in table["serve"] if r.name.endswith("_a")]
    assert SERVER_OPTIONS["serve_api4"] == SERVER_OPTIONS["serve_api4_ramp"] == ["--api-server-count", "4"]


def test_the_admit_plan_runs_the_offline_baseline_with_the_ramp_off_and_on():
    from benchmarks.acceptance_runs import plans

    runs = plans(tiny=False)["admit"]
    assert [r.name for r in runs] == ["offline_64_ramp0", "offline_64_ramp1", "offline_256_ramp0", "offline_256_ramp1"]
    assert [r.env for r in runs] == [{"TANDEM_ADMIT_RAMP": v} for v in "0101"]
    assert runs[0].argv == plans(tiny=False)["serve_offline"][0].argv


def test_the_graphs_plan_runs_the_offline_baseline_with_larger_piecewise_graphs_and_the_ramp():
    from benchmarks.acceptance_runs import plans

    runs = plans(tiny=False)["graphs"]
    assert [r.name for r in runs[:4]] == ["offline_64_pw512_ramp0", "offline_64_pw2048_ramp0",
                                          "offline_64_pw8192_ramp0", "offline_64_pw2048_ramp1"]
    assert len(runs) == 8 and runs[3].env == {"TANDEM_PIECEWISE_MAX_TOKENS": "2048", "TANDEM_ADMIT_RAMP": "1"}
