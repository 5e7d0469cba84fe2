"""The summary of ``scripts/sanitizer_run.sh``: reads the logs it wrote in OUTDIR and prints what
docs/RELIABILITY.md records. Exit 0 when every stage is clean: no memcheck error, no racecheck
hazard, every workload request ended, all of at least 200 differential cases identical.

Usage: python3 scripts/sanitizer_summary.py OUTDIR"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

MIN_DIFF_CASES = 200


@dataclass
class Stage:
    name: str
    clean: bool
    line: str


def _read(out: Path, name: str) -> str:
    path = out / name
    return path.read_text(errors="replace") if path.exists() else ""


def _stage_status(out: Path) -> dict[str, tuple[int, int]]:
    """Stage -> (exit status, seconds), from stages.txt."""
    found = {}
    for m in re.finditer(r"^(\w+) rc=(\d+) seconds=(\d+)$", _read(out, "stages.txt"), re.M):
        found[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return found


def _workload(log: str) -> tuple[bool, str]:
    m = re.search(r"^workload: (.*)$", log, re.M)
    if m is None:
        return False, "the workload did not finish"
    return m.group(1).endswith("every request ended"), m.group(1)


def _sanitizer(name: str, log: str, status: tuple[int, int] | None) -> Stage:
    rc, seconds = status or (-1, 0)
    errors = re.search(r"ERROR SUMMARY: (\d+) error", log)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log)
    finished, workload = _workload(log)
    if name.startswith("racecheck") and hazards:
        found = f"{hazards.group(1)} hazards ({hazards.group(2)} errors, {hazards.group(3)} warnings)"
        ok = hazards.group(1) == "0"
    elif errors:
        found, ok = f"{errors.group(1)} errors", errors.group(1) == "0"
    else:
        found, ok = "no sanitizer summary in the log", False
    timed_out = " TIMED OUT" if rc in (124, 137) else ""
    line = f"{name:<12} {found} (exit {rc}{timed_out}, {seconds} s); {workload}"
    return Stage(name, ok and finished and rc == 0, line)


def _differential(log: str, status: tuple[int, int] | None) -> Stage:
    rc, seconds = status or (-1, 0)
    m = re.search(r"differential \(([^)]*)\): (\d+)/(\d+) cases identical in (\d+) s", log)
    if m is None:
        return Stage("differential", False, f"differential no result line (exit {rc}, {seconds} s)")
    same, total = int(m.group(2)), int(m.group(3))
    ok = rc == 0 and same == total >= MIN_DIFF_CASES
    return Stage("differential", ok, f"differential {same}/{total} cases identical ({m.group(1)}) in {m.group(4)} s "
                                     f"(exit {rc})")


def summarize(out: Path) -> list[Stage]:
    """Every stage stages.txt names, in its order (the core set: memcheck, racecheck, differential;
    the kernels set: memcheck_* and racecheck_* on other models and weight formats)."""
    status = _stage_status(out)
    names = list(status) or ["memcheck", "racecheck", "differential"]
    return [_differential(_read(out, f"{n}.log"), status.get(n)) if n == "differential"
            else _sanitizer(n, _read(out, f"{n}.log"), status.get(n)) for n in names]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    stages = summarize(out)
    print("== sanitizer_run summary ==")
    print(_read(out, "env.txt").strip())
    for stage in stages:
        print(stage.line)
    bad = [s.name for s in stages if not s.clean]
    print("RESULT: CLEAN" if not bad else f"RESULT: PROBLEMS in {', '.join(bad)} (see {out}/*.log)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
