"""The GPU acceptance runner (``scripts/acceptance_runs.py``) runs on an H100 elsewhere; here its
plans run in their ``--tiny`` shape on the CPU, a real server included, and its table is checked.

Runs that differ only in counts (requests, sequences, lengths, seeds) share a command shape; in
``--tiny`` most of them are the very same command. Of the plans a test names, each shape runs once end
to end (through the script's own ``run_plan``: its runs, its server, its table rows) and every other
run is one of those commands with other counts, so every flag and every combination of flags that the
plans send runs here. The script's ``main`` (plans by name, the table printed and saved) is run whole
where a deadline skips every run."""
from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

from benchmarks.acceptance_runs import SERVER_ENV, SERVER_OPTIONS, Run, execute, plans, run_plan

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "acceptance_runs.py"
COUNT = re.compile(r"\d+(:\d+)?")  # a count or a range of lengths; 0.8 (a temperature) is no count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--tiny", "--port", str(_free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _shape(run: Run, plan: str) -> tuple:
    """The run's command without the options that take a count (what can fail apart from the figures),
    with its plan's server for a served run."""
    argv, kept, i = run.argv, [], 0
    while i < len(argv):
        counted = argv[i].startswith("--") and i + 1 < len(argv) and COUNT.fullmatch(argv[i + 1])
        kept += [] if counted else [argv[i]]
        i += 2 if counted else 1
    served = run.kind == "serve"
    server = (tuple(SERVER_OPTIONS.get(plan, ())), tuple(SERVER_ENV.get(plan, {}).items())) if served else ()
    return tuple(kept), tuple(sorted(run.env.items())), run.kind, server


def _run_shapes(out: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """The plans ``names`` with one run of each shape (the last, the largest where sizes differ), in
    order, as the script runs them: (every run's name, the table's line of each run that ran)."""
    table, last = plans(tiny=True), {}
    for plan in names:
        for run in table[plan]:
            last[_shape(run, plan)] = run.name
    args = Namespace(out_dir=out, tiny=True, port=_free_port(), deadline_s=math.inf)
    lines: list[str] = []
    with open(out / "log.txt", "a") as log:
        for plan in names:
            chosen = [run for run in table[plan] if last[_shape(run, plan)] == run.name]
            lines += run_plan(chosen, args, log, time.monotonic(), plan)
    assert not any("FAILED" in line or "skipped" in line for line in lines), "\n".join(lines)
    return [run.name for plan in names for run in table[plan]], lines


def _names(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines]


def test_offline_and_served_plans_run_and_fill_the_table(tmp_path):
    names, lines = _run_shapes(tmp_path, ["long", "serve"])
    assert names == ["M_len131072", "offline_64", "serve_64_a", "serve_64_b", "offline_256", "serve_256_a",
                     "serve_256_b"]
    # M's long block tables are 512 tokens in --tiny: the offline runs' shape
    assert _names(lines) == ["offline_256", "serve_256_b"]
    assert "sync == async: True" in lines[0] and " tok/s" in lines[1] and "errors 0" in lines[1]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("rc=0") == 2 and "server exit status 0" in log
    # the offline run of the serve plan ends before its server starts (beside it, the GPU's memory is taken)
    assert log.index("(background)") > log.rindex("bench --model random:tiny --num-requests 8")


def test_a_deadline_skips_what_would_start_late(tmp_path):
    done = _run(tmp_path, "--plans", "offline,serve", "--deadline-s", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 9 and all(line.endswith("skipped (deadline or no server)") for line in lines)
    assert "###" not in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "summary.txt").read_text().splitlines() == lines


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
    names, lines = _run_shapes(tmp_path, ["structured", "seam", "moe"])
    assert names == ["M_json", "M_free", "G1", "G4", "TB_native", "TB", "Q30", "Q30_fp8"]
    # M_free's shape is TB_native's (both plain, async), and G1's G4's (one tiny Gemma in --tiny)
    assert _names(lines) == ["M_json", "G4", "TB_native", "TB", "Q30", "Q30_fp8"]
    assert all("sync == async: True" in line for line in lines)
    log = (tmp_path / "log.txt").read_text()
    assert "--structured-output json" in log and "--model-impl transformers" in log and "qwen3-moe" in log
    assert "--quantization fp8" in log


def test_the_spec_and_quant_plans_run(tmp_path):
    names, lines = _run_shapes(tmp_path, ["spec", "quant"])
    assert names == ["b1_none", "b1_draft", "b1_rep_none", "b1_rep_ngram", "b8_none", "b8_draft", "b8_rep_none",
                     "b8_rep_ngram", "b1_bf16", "b1_int4", "S_bf16", "S_fp8"]
    # speculation at batch 8 (batch 1's shape); the unquantized runs' shape is plain async's, as S_bf16's
    assert _names(lines) == ["b8_draft", "b8_rep_none", "b8_rep_ngram", "b1_int4", "S_bf16", "S_fp8"]
    speculating = [line for line in lines if "_draft" in line or "_ngram" in line]
    assert len(speculating) == 2 and all("accepted" in line and "tokens/step" in line for line in speculating)
    log = (tmp_path / "log.txt").read_text()
    assert "--repeat-span 16" in log and "--quantization int4" in log and "--quantization fp8" in log


def test_the_seed_batch_one_and_chat_plans_run(tmp_path):
    names, lines = _run_shapes(tmp_path, ["seed", "b1", "chat"])
    assert names == ["seed", "seed_kv_fp8", "seed_kv_fp8_w_fp8", "b1_1b", "b1_8b", "chat_1b", "chat_8b"]
    # the 1B and the 8B model are one random:tiny in --tiny
    assert _names(lines) == ["seed", "seed_kv_fp8", "seed_kv_fp8_w_fp8", "b1_8b", "chat_8b"]
    log = (tmp_path / "log.txt").read_text()
    assert log.count("--kv-cache-dtype fp8") == 2 and "--temperature 0.8" in log and "--prompt-len 16:16" in log


def test_the_gemv_plan_is_the_batch_one_plan_with_the_gemv_off_and_on():
    table = plans(tiny=True)
    runs = table["gemv"]
    assert [r.name for r in runs] == ["b1_1b_gemv0", "b1_1b_gemv1", "b1_8b_gemv0", "b1_8b_gemv1"]
    assert [r.env for r in runs] == [{"TANDEM_GEMV": v} for v in "0101"]
    assert [r.argv for r in runs[::2]] == [r.argv for r in table["b1"]]


def test_a_runs_environment_reaches_it_and_is_logged_with_its_command(tmp_path):
    probe = Run("probe", [sys.executable, "-c", "import os; print('seen', os.environ['TANDEM_GEMV'])"],
                {"TANDEM_GEMV": "1"}, "check")
    with open(tmp_path / "log.txt", "w") as log:
        assert execute(probe, tmp_path, log, None) == 0
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith(f"### TANDEM_GEMV=1 {sys.executable} -c") and "seen 1" in text


def test_the_serve_plans_with_an_interval_run_and_four_api_processes_with_the_ramp(tmp_path):
    names, lines = _run_shapes(tmp_path, ["serve_si8", "serve_api4_ramp"])
    assert names == [f"serve_{c}_a_{plan}" for plan in ("si8", "api4_ramp") for c in (64, 256)]
    assert _names(lines) == ["serve_256_a_si8", "serve_256_a_api4_ramp"]
    # one file each, none overwritten: every served run of every plan has a name of its own
    assert all((tmp_path / f"{name}.json").is_file() for name in _names(lines))
    served = [r.name for runs in plans(tiny=True).values() for r in runs if r.kind == "serve"]
    assert len(set(served)) == len(served)
    assert all("errors 0" in line for line in lines)
    log = (tmp_path / "log.txt").read_text()
    assert "--api-server-count 4" in log and "--stream-interval 8" in log
    assert log.count("TANDEM_ADMIT_RAMP=1 ") == 1  # the ramp plan's server, and only its
    for plan in ("serve_si8", "serve_api4_ramp"):  # each server's step gaps, written as it stopped
        assert json.loads((tmp_path / f"{plan}_server_steps.json").read_text())["steps"] > 0


def test_the_served_variants_share_the_serve_plans_runs_and_its_offline_baseline():
    table = plans(tiny=False)
    assert [r.name for r in table["serve_offline"]] == ["offline_64", "offline_256"]
    assert all(r.kind == "bench" for r in table["serve_offline"])
    for plan in ("serve_api4", "serve_si8", "serve_api4_ramp"):
        assert [r.name for r in table[plan]] == [f"serve_64_a_{plan[6:]}", f"serve_256_a_{plan[6:]}"]
        assert [r.argv for r in table[plan]] == [r.argv for r in table["serve"] if r.name.endswith("_a")]
    assert SERVER_OPTIONS["serve_api4"] == SERVER_OPTIONS["serve_api4_ramp"] == ["--api-server-count", "4"]


def test_the_admit_plan_runs_the_offline_baseline_with_the_ramp_off_and_on():
    runs = plans(tiny=False)["admit"]
    assert [r.name for r in runs] == ["offline_64_ramp0", "offline_64_ramp1", "offline_256_ramp0", "offline_256_ramp1"]
    assert [r.env for r in runs] == [{"TANDEM_ADMIT_RAMP": v} for v in "0101"]
    assert runs[0].argv == plans(tiny=False)["serve_offline"][0].argv


def test_the_graphs_plan_runs_the_offline_baseline_with_larger_piecewise_graphs_and_the_ramp():
    runs = plans(tiny=False)["graphs"]
    assert [r.name for r in runs[:4]] == ["offline_64_pw512_ramp0", "offline_64_pw2048_ramp0",
                                          "offline_64_pw8192_ramp0", "offline_64_pw2048_ramp1"]
    assert len(runs) == 8 and runs[3].env == {"TANDEM_PIECEWISE_MAX_TOKENS": "2048", "TANDEM_ADMIT_RAMP": "1"}
