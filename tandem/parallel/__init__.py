"""Tensor parallelism: a group of ranks, one process per GPU (or per CPU "device" over gloo), that
together implement the engine's ``Worker`` interface. Rank 0 lives in the engine's process and drives;
the other ranks (spawned here, or started by torchrun) replay every step it submits. See
docs/tensor_parallel.md."""
