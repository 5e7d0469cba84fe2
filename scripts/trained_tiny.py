"""benchmarks/trained_tiny.py by its scripts/ path, as the other tools."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.forward import forward  # noqa: E402
forward(globals(), "trained_tiny")
