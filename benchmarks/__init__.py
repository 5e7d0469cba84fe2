"""The repository's GPU and host benchmarks and checks, as one runner: ``python3 -m benchmarks``
lists them, ``python3 -m benchmarks NAME [ARGS]`` runs one (from the repository root). Each was a
one-off script in ``scripts/``; ``scripts/NAME.py`` still runs it (a thin wrapper, see
``forward.py``). ``tandem bench`` itself is the engine's benchmark; these measure kernels, check
correctness on a GPU and drive series of ``tandem bench`` runs."""
