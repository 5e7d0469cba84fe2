"""Quantized weights: ``config`` parses a checkpoint's ``quantization_config`` (torch-free), ``linear``
is the seam the model code applies weights through, ``fp8`` the FP8 weight and its GEMM, ``reader``
the Getter that reads quantized checkpoints (or quantizes dense weights at load)."""
