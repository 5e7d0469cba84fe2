"""Running a loaded transformers model once, before its first step, to learn what tandem needs and to
refuse what it cannot run correctly.

A few tokens go through the model with the attention function recording each layer's call and
attending every token to itself only (``transformers_attention``). Then:
- every layer's attention went through the interface exactly once, with one KV layout, and its
  keyword arguments give the layer's ``AttentionSpec`` (scale, sliding window, soft-cap);
- the same tokens in reverse order give the same per-token outputs: with attention reduced to the
  identity, a token's output may depend only on its own id and position, so a model that mixes tokens
  any other way (convolutions, recurrences, positions taken from the order) is refused;
- tandem's logits (``compute_logits`` on the decoder's output) are the model's own: a transform after
  the head that tandem does not reproduce is refused;
- on CUDA, whether the decoder's forward can be captured in a CUDA graph (no host synchronisation)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.model.attention.base import AttentionSpec
from tandem.model.models.transformers_attention import LayerCall, StepContext, spec_of

logger = logging.getLogger(__name__)

_PROBE_TOKENS = 8


@dataclass(frozen=True)
class ProbeResult:
    num_kv_heads: int
    head_dim: int
    specs: tuple[AttentionSpec, ...]
    cuda_graphs: bool


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def probe(hf: torch.nn.Module, decoder: torch.nn.Module, ctx: StepContext,
          logits: Callable[[torch.Tensor], torch.Tensor], sliding: tuple[bool, ...], vocab_size: int) -> ProbeResult:
    """``decoder``: the model without its head; ``logits``: tandem's head on the decoder's output;
    ``sliding``: per layer, whether the config makes it a sliding-window layer."""
    device, dtype = next(hf.parameters()).device, next(hf.parameters()).dtype
    ids = (torch.arange(_PROBE_TOKENS, device=device) * 7919 + 3) % vocab_size
    positions = torch.arange(_PROBE_TOKENS, device=device)
    captured: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out[0][0]))
    ctx.recorded = []
    try:
        with torch.no_grad():
            ref_logits = hf(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
            calls = ctx.recorded
            ctx.recorded = []
            back = torch.arange(_PROBE_TOKENS - 1, -1, -1, device=device)
            reversed_hidden = decoder(input_ids=ids[back][None], position_ids=positions[back][None],
                                      use_cache=False)[0][0]
            hidden = captured[0]
            ours = logits(hidden)
    finally:
        hook.remove()
        ctx.recorded = None
    result = _layers(calls, sliding)
    tol = _tolerance(dtype)
    if _relative_error(reversed_hidden[back], hidden) > tol:
        raise NotImplementedError("the model mixes tokens outside its attention layers (convolution, recurrence, "
                                  "or positions taken from the token order): tandem's flat batch would mix sequences")
    if _relative_error(ours, ref_logits) > tol:
        raise NotImplementedError(f"{type(hf).__name__} transforms its logits after the output head in a way tandem "
                                  "does not reproduce (tandem applies logits_scaling, logit_scale and "
                                  "final_logit_softcapping)")
    graphs = device.type == "cuda" and _capturable(decoder, ids, positions, ctx)
    return ProbeResult(result.num_kv_heads, result.head_dim, result.specs, graphs)


def _layers(calls: list[LayerCall], sliding: tuple[bool, ...]) -> ProbeResult:
    """The KV layout and per-layer specs from one forward's calls (layer i's call at index i)."""
    seen = [c.layer for c in calls]
    if seen != list(range(len(sliding))):
        raise NotImplementedError(f"of the model's {len(sliding)} layers, the attention of {len(calls)} went through "
                                  f"transformers' attention interface (layer indices {seen}): the others are "
                                  "recurrent, state-space or custom attention, which tandem cannot route")
    layouts = {(c.kv_heads, c.head_dim, c.v_head_dim) for c in calls}
    if len(layouts) > 1:
        raise NotImplementedError(f"the layers' key/value layouts differ ({sorted(layouts)} as (KV heads, key dim, "
                                  "value dim)): tandem's KV cache has one layout for every layer")
    kv_heads, head_dim, v_dim = layouts.pop()
    if v_dim != head_dim or any(c.q_heads % kv_heads for c in calls):
        raise NotImplementedError(f"attention with value dim {v_dim} != key dim {head_dim} or query heads not a "
                                  f"multiple of the {kv_heads} KV heads: tandem's paged attention cannot run it")
    specs = tuple(spec_of(c, window) for c, window in zip(calls, sliding))
    return ProbeResult(kv_heads, head_dim, specs, False)


def _capturable(decoder: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> bool:
    """Whether the decoder's forward records into a CUDA graph (transformers code that reads a device
    value on the host cannot be captured: the worker then runs this model's steps eagerly)."""
    stream = torch.cuda.Stream(ids.device)
    stream.wait_stream(torch.cuda.current_stream(ids.device))
    ctx.recorded = []
    try:
        with torch.no_grad(), torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                decoder(input_ids=ids[None], position_ids=positions[None], use_cache=False)
        del graph
        return True
    except RuntimeError as exc:
        logger.warning("the transformers backend runs %s without CUDA graphs: its forward cannot be captured (%s)",
                       type(decoder).__name__, str(exc).splitlines()[0])
        return False
    finally:
        ctx.recorded = None
        torch.cuda.synchronize(ids.device)
