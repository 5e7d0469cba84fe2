"""Speculative decoding: the options (``config``), the proposers (``proposer``: n-gram prompt lookup
on the host, a draft model on the worker) and the verification rules (``verify``). See
docs/pipeline.md, "Speculative decoding"."""
