"""Moved to benchmarks/decode_sweep.py (`python3 -m benchmarks decode-sweep`); this path runs it as before."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.forward import forward  # noqa: E402
forward(globals(), "decode_sweep")
