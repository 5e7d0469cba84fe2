"""Moved to benchmarks/w4a16_bench.py (`python3 -m benchmarks w4a16-bench`); this path runs it as before."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.forward import forward  # noqa: E402
forward(globals(), "w4a16_bench")
