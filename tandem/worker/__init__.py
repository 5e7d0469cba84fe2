"""The device side: model weights, KV cache, CUDA graphs, executors, the model runner, the sampler.
It imports the contract (``tandem.contract``), the model and the kernels, never the engine; which
worker runs (one device, or a tensor-parallel group) is chosen above both, in ``tandem.runtime``."""
