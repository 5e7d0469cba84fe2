"""The GPU sanitizer run (issue 12, item 7) is executed on an H100 elsewhere; here, on the CPU, its
parts are checked: the shell script parses and refuses clearly where it cannot run, the workload
runs to the end (aborts, preemption, mixed steps) on the CPU, and the summary reads compute-
sanitizer's and the differential check's result lines right, clean or not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = ROOT / "scripts"


def test_the_run_script_parses_and_refuses_without_a_sanitizer(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPTS / "sanitizer_run.sh")], check=True)
    done = subprocess.run(["bash", str(SCRIPTS / "sanitizer_run.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "COMPUTE_SANITIZER": "/nonexistent/cs"},
                          timeout=60)
    assert done.returncode == 2 and "compute-sanitizer not found" in done.stdout


def test_the_workload_runs_to_the_end_on_the_cpu():
    done = subprocess.run([sys.executable, str(SCRIPTS / "sanitizer_workload.py"), "--device", "cpu", "--requests",
                           "16"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("workload: "))
    assert "every request ended" in line and " 0 preemptions" not in line and "aborted" in line
    assert " 0 mixed" not in line


CLEAN = {
    "env.txt": "commit: abc1234\ngpu: NVIDIA H100 80GB HBM3, 570.00\n",
    "stages.txt": "memcheck rc=0 seconds=150\nracecheck rc=0 seconds=160\ndifferential rc=0 seconds=60\n",
    "memcheck.log": "workload: 24 requests (...), prefix caching on, 90 s; every request ended\n"
                    "========= ERROR SUMMARY: 0 errors\n",
    "racecheck.log": "workload: 12 requests (...); every request ended\n"
                     "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n",
    "differential.log": "differential (float32, CUDA graphs on): 200/200 cases identical in 55 s\nALL OK\n",
}


def _summary(tmp_path: Path, **changes: str) -> subprocess.CompletedProcess:
    for name, text in {**CLEAN, **changes}.items():
        (tmp_path / name).write_text(text)
    return subprocess.run([sys.executable, str(SCRIPTS / "sanitizer_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)


def test_the_summary_of_a_clean_run(tmp_path):
    done = _summary(tmp_path)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("RESULT: CLEAN"), done.stdout
    assert "memcheck     0 errors" in done.stdout and "200/200 cases identical" in done.stdout


@pytest.mark.parametrize("changes, bad", [
    ({"memcheck.log": CLEAN["memcheck.log"].replace("0 errors", "3 errors")}, "memcheck"),
    ({"racecheck.log": CLEAN["racecheck.log"].replace("0 hazards displayed (0 errors",
                                                      "2 hazards displayed (2 errors")}, "racecheck"),
    ({"memcheck.log": "========= ERROR SUMMARY: 0 errors\n"}, "memcheck"),  # the workload never finished
    ({"differential.log": "differential (float32, CUDA graphs on): 199/200 cases identical in 55 s\n"}, "differential"),
    ({"differential.log": "differential (float32, CUDA graphs on): 40/40 cases identical in 9 s\n"}, "differential"),
    ({"stages.txt": CLEAN["stages.txt"].replace("racecheck rc=0", "racecheck rc=124")}, "racecheck"),
])
def test_the_summary_names_what_is_not_clean(tmp_path, changes, bad):
    done = _summary(tmp_path, **changes)
    assert done.returncode == 1 and f"RESULT: PROBLEMS in {bad}" in done.stdout, done.stdout


def test_the_summary_of_the_kernels_set_reads_every_stage_it_ran(tmp_path):
    clean_mem, clean_race = CLEAN["memcheck.log"], CLEAN["racecheck.log"]
    stages = {f"{tool}_{w}": text for w in ("int4", "moe_fp8") for tool, text in
              (("memcheck", clean_mem), ("racecheck", clean_race))}
    files = {f"{n}.log": text for n, text in stages.items()}
    files["stages.txt"] = "".join(f"{n} rc=0 seconds=40\n" for n in stages)
    done = _summary(tmp_path, **files)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("RESULT: CLEAN"), done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines() if "_" in line.split()[0]] == list(stages)
    assert "differential" not in done.stdout  # the core set's logs lie there too, but this run's stages do not name them
    files["racecheck_moe_fp8.log"] = clean_race.replace("0 hazards displayed (0 errors", "1 hazards displayed (1 errors")
    bad = _summary(tmp_path, **files)
    assert bad.returncode == 1 and "PROBLEMS in racecheck_moe_fp8" in bad.stdout, bad.stdout
