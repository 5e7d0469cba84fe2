"""Building blocks the model families share: norms, rotary embeddings, MLP activations, the KV store.

Each is the plain PyTorch form, the reference of the fused Triton kernels in ``tandem/kernels``."""
