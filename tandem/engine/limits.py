"""What the step contract can carry: a request whose per-request step fields do not fit their packed
dtype (``top_k = 2**63`` in an int64 word) would pass ``SamplingParams``' range checks and then fail
the whole step it joins, with every other request in it. Checked when a request is accepted, so it
fails alone with a ``ValueError`` naming the field."""
from __future__ import annotations

from types import SimpleNamespace

from tandem.contract.step import REQUEST_INT_FIELDS, request_values
from tandem.engine.sequence import EngineRequest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_PARAM_OF_FIELD = {"seeds": "seed"}  # step field -> the SamplingParams field it comes from


def check_representable(request: EngineRequest) -> None:
    """Raise ValueError (``SamplingParams.<field> ...``) if a value cannot cross to the device."""
    fields = SimpleNamespace(params=request.params, seed=request.seed, prompt_len=len(request.prompt_token_ids))
    for f, value in zip(REQUEST_INT_FIELDS, request_values(fields)[0]):
        if not INT64_MIN <= value <= INT64_MAX:
            name = _PARAM_OF_FIELD.get(f.name, f.name)
            raise ValueError(f"SamplingParams.{name} must fit in a signed 64-bit integer, got {value}")
    too_big = [t for t in request.params.stop_token_ids if t > INT64_MAX]
    if too_big:
        raise ValueError(f"SamplingParams.stop_token_ids must fit in a signed 64-bit integer, got {too_big[0]}")
