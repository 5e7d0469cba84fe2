"""``n`` completions of one prompt as n independent engine requests (a frontend concern: the engine
core knows nothing of ``n``). The offline ``LLM`` and the server both use it. The children share
the prompt's full KV blocks through the prefix cache; each recomputes only the prompt's last,
partial block.

Child i of a seeded request uses seed + i (wrapped into int64), so the n samples differ from each
other and each is reproducible on its own; unseeded children draw their seeds when added."""
from __future__ import annotations

import dataclasses

from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams

_INT64 = 2**64


def child_seed(seed: int | None, index: int) -> int | None:
    if seed is None:
        return None
    return (seed + index + _INT64 // 2) % _INT64 - _INT64 // 2  # stays a signed 64-bit value


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{index}"


def fan_out(request_id: str, params: SamplingParams, n: int | None = None) -> list[tuple[str, SamplingParams]]:
    """The (child id, params with n = 1) of each of the ``n`` samples (default ``params.n``)."""
    n = params.n if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return [(request_id, params if params.n == 1 else dataclasses.replace(params, n=1))]
    return [(child_id(request_id, i, n), dataclasses.replace(params, n=1, seed=child_seed(params.seed, i)))
            for i in range(n)]


def fan_in(request_id: str, children: list[RequestOutput]) -> RequestOutput:
    """One output with a completion per child, indexed in child order (all of the same prompt)."""
    first = children[0]
    completions = [dataclasses.replace(c.outputs[0], index=i) for i, c in enumerate(children)]
    return RequestOutput(request_id, first.prompt, first.prompt_token_ids, completions,
                         all(c.finished for c in children), prompt_logprobs=first.prompt_logprobs)
