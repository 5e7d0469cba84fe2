"""Moved to benchmarks/ncu_quant.py (`python3 -m benchmarks ncu-quant`); this path runs it as before."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.forward import forward  # noqa: E402
forward(globals(), "ncu_quant")
