"""Moved to benchmarks/gpu_fp8.py (`python3 -m benchmarks gpu-fp8`); this path runs it as before."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.forward import forward  # noqa: E402
forward(globals(), "gpu_fp8")
