"""Paged attention behind one interface. ``select_backend`` is the one place that picks a kernel for
a step; each backend builds its own metadata from the step's inputs (``AttentionInputs``)."""
from tandem.model.attention.base import AttentionBackend, AttentionInputs, StepAttention
from tandem.model.attention.selector import select_backend, step_attention

__all__ = ["AttentionBackend", "AttentionInputs", "StepAttention", "select_backend", "step_attention"]
