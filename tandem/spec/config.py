"""``--speculative-config``: vLLM's JSON shape, checked field by field (unknown keys are refused).

Plain data, torch-free: the engine config parses it, the host reads it."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft")
#: vLLM's names for the same methods
ALIASES = {"draft_model": "draft", "[ngram]": "ngram"}
#: vLLM's other methods: their proposers are not built (the interface has room for them)
NOT_BUILT = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "deepseek_mtp")
#: speculation is off for a step when more requests than this are running or waiting
DEFAULT_DISABLE_BY_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 5  # n-gram: the longest suffix matched
    prompt_lookup_min: int = 1  # n-gram: the shortest
    model: str | None = None  # draft: a checkpoint folder or random:<preset> sharing the target's tokenizer
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    @property
    def k(self) -> int:
        return self.num_speculative_tokens


def parse_speculative_config(value: str | dict[str, Any]) -> SpeculativeConfig:
    """A JSON object (or its dict) -> the config; anything wrong is a ValueError naming it."""
    options = _object(value)
    known = {f.name for f in fields(SpeculativeConfig)}
    if set(options) - known:
        raise ValueError(f"speculative_config: unknown key(s) {sorted(set(options) - known)}; known: {sorted(known)}")
    method = options.get("method") or ("draft" if options.get("model") else None)
    method = ALIASES.get(method, method)
    if method in NOT_BUILT:
        raise ValueError(f"speculative_config: method {method!r} is not built; use one of {METHODS}")
    if method not in METHODS:
        raise ValueError(f"speculative_config: method must be one of {METHODS}, got {options.get('method')!r}")
    options["method"] = method
    if "num_speculative_tokens" not in options:
        raise ValueError("speculative_config: num_speculative_tokens is required")
    for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
        v = options.get(name, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {v!r}")
    config = SpeculativeConfig(**options)
    if config.prompt_lookup_min > config.prompt_lookup_max:
        raise ValueError(f"speculative_config: prompt_lookup_min ({config.prompt_lookup_min}) is above "
                         f"prompt_lookup_max ({config.prompt_lookup_max})")
    if method == "draft" and not config.model:
        raise ValueError("speculative_config: method 'draft' needs \"model\" (a checkpoint folder or random:<preset>)")
    if method == "ngram" and config.model is not None:
        raise ValueError("speculative_config: \"model\" is for method 'draft'; n-gram lookup uses no model")
    return config


def _object(value: str | dict[str, Any]) -> dict[str, Any]:
    """The option as a dict (a copy): given as one, or as the JSON text of one."""
    decoded = value
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    if isinstance(decoded, dict):
        return dict(decoded)
    raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
