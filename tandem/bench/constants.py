"""What the CLI needs of the benchmark without importing it (no torch)."""

GPU_DEFAULT_MODEL = "random:llama3.2-1b"  # what ``tandem bench`` runs on a GPU, and simulates elsewhere
VALID_MODES = ("sync", "async")
#: ``simulated_device``: off; on (after the real run); only (no real run, no model loaded); auto (on
#: where the real run's device is a CPU, which cannot show the overlap)
SIMULATED_DEVICE = ("off", "on", "only", "auto")
