"""The benchmarks runner (``python3 -m benchmarks``, issue 26 point 6) and the ``scripts/*.py``
wrappers that keep every old command line working."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_script_is_a_tool_and_every_wrapper_names_its_module():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.__main__ import _is_wrapper, listing, tools
    finally:
        sys.path.remove(str(ROOT))
    found = tools()
    for script in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "scripts").glob("*.sh")]:
        if script.name == "install.sh":
            continue
        name = script.stem.replace("_", "-")
        assert name in found, script
        if _is_wrapper(script):  # the tool is the file it forwards to
            assert found[name] == ROOT / "benchmarks" / script.name
            assert (f'forward(globals(), "{script.stem}")' if script.suffix == ".py"
                    else f"/../benchmarks/{script.name}") in script.read_text()
        else:
            assert found[name] == script
    assert "install" not in found and "forward" not in found
    assert all(len(line) <= 100 for line in listing().splitlines())


def test_the_three_ways_to_run_a_tool_agree(tmp_path):
    # the sanitizer summary of an empty run folder: the old path, the runner, the module's own path
    (tmp_path / "memcheck.txt").write_text("========= ERROR SUMMARY: 0 errors\n")
    runs = [_python("scripts/sanitizer_summary.py", str(tmp_path)),
            _python("-m", "benchmarks", "sanitizer-summary", str(tmp_path)),
            _python("-m", "benchmarks", "sanitizer_summary", str(tmp_path)),
            _python("benchmarks/sanitizer_summary.py", str(tmp_path))]
    assert len({(r.returncode, r.stdout) for r in runs}) == 1, runs
    assert "memcheck" in runs[0].stdout


def test_a_wrapper_imported_by_name_is_the_module():
    # the tools import each other by bare name with scripts/ on the path (kernel_bench -> moe_bench)
    code = ("import sys; sys.path.insert(0, 'scripts'); import sanitizer_summary as s; "
            "import benchmarks.sanitizer_summary as real; print(s is real, s.main is real.main)")
    assert _python("-c", code).stdout.split() == ["True", "True"]


def test_an_unknown_tool_is_refused_with_the_list():
    done = _python("-m", "benchmarks", "no-such-tool")
    assert done.returncode == 2 and "no tool named 'no-such-tool'" in done.stderr and "gpu-checks" in done.stderr
    listed = _python("-m", "benchmarks")
    assert listed.returncode == 0 and "acceptance-runs" in listed.stdout
