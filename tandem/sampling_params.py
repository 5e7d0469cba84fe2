"""Per-request sampling parameters, validated on construction (vLLM's shape).

Every field is checked for type and range; a bad value raises ``ValueError`` naming the field, so
a request from a client fails alone and clearly."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tandem.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (logprobs, prompt_logprobs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value
# The device divides positive logits by the repetition penalty in float32: a smaller penalty (5e-324
# is 0 there) made them infinite, and sampling at temperature > 0 then drew from NaNs (under a
# grammar, a token it rejects: an engine fault). Above this every finite logit stays finite.
MIN_REPETITION_PENALTY = 1e-6
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32 (the device's temperature)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # vLLM's range: every seed in it draws its own noise


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` means greedy. ``seed`` makes sampling reproducible: the same
    request with the same seed yields the same tokens whatever else shares its batch.

    Fields may be changed after construction: the engine takes a checked copy (``checked_copy``)
    when a request is added, so a value set later is validated then, and changes made after that
    do not reach the running request.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    # --- token restrictions (issue 23): never sampled / the only ones that may be ---
    bad_words: list[str] | None = None  # each word, alone or after a space, is never generated
    allowed_token_ids: list[int] | None = None  # a row samples only these (the device masks the rest)
    #: the token sequences ``bad_words`` stand for: set by the engine's InputProcessor (its tokenizer)
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    # --- end of the token restrictions ---
    #: the output must match this (a JSON schema, regex, choice, EBNF grammar or any JSON object;
    #: ``tandem.structured_outputs``); enforced by a grammar mask at every sampled token
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate_types()
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate_ranges()

    def checked_copy(self) -> SamplingParams:
        """A copy validated afresh (``ValueError`` naming the field), sharing no list or dict with
        this object."""
        stop = self.stop if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)) else list(self.stop)
        ids = list(self.stop_token_ids) if isinstance(self.stop_token_ids, (list, tuple)) else self.stop_token_ids
        bias = dict(self.logit_bias) if isinstance(self.logit_bias, dict) else self.logit_bias
        structured = self.structured_outputs
        if isinstance(structured, StructuredOutputsParams):
            structured = structured.copied()  # validated afresh too
        return dataclasses.replace(self, stop=stop, stop_token_ids=ids, logit_bias=bias, structured_outputs=structured,
                                   **self._restriction_copies())

    def _validate_types(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            _require_int(self, name)
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _require_int(self, name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _require_number(self, name)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(self, name, "must be a bool")
        stop = self.stop
        if stop is not None and not isinstance(stop, str) and not (
                isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise _bad(self, "stop", "must be a string or a list of strings")
        ids = self.stop_token_ids
        if ids is not None and not (isinstance(ids, (list, tuple)) and all(_is_int(t) for t in ids)):
            raise _bad(self, "stop_token_ids", "must be a list of ints")
        bias = self.logit_bias
        if bias is not None and not (isinstance(bias, dict) and all(
                _is_int(k) and _is_finite(v) for k, v in bias.items())):
            raise _bad(self, "logit_bias", "must map token ids (ints) to finite numbers")
        self._validate_restriction_types()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad(self, "structured_outputs", "must be a StructuredOutputsParams (tandem.structured_outputs)")

    def _validate_ranges(self) -> None:
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("seed", self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer)"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0 or self.top_k == -1, "must be -1 or 0 (disabled) or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("stop", all(self.stop_strings), "must be non-empty strings"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be non-negative ints"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must be <= max_tokens"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10.0,
             f"must be in [{MIN_REPETITION_PENALTY:g}, 10]"),
            ("logit_bias", all(k >= 0 and abs(v) <= MAX_LOGIT_BIAS for k, v in (self.logit_bias or {}).items()),
             f"must have token ids >= 0 and values in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
        ]
        for name, ok, why in checks + self._restriction_checks():
            if not ok:
                raise _bad(self, name, why)

    # --- token restrictions ---------------------------------------------------------------------
    def _validate_restriction_types(self) -> None:
        if self.bad_words is not None and not (isinstance(self.bad_words, (list, tuple))
                                               and all(isinstance(w, str) for w in self.bad_words)):
            raise _bad(self, "bad_words", "must be a list of strings")
        if self.allowed_token_ids is not None and not _int_list(self.allowed_token_ids):
            raise _bad(self, "allowed_token_ids", "must be a list of ints")
        seqs = self.bad_words_token_ids
        if seqs is not None and not (isinstance(seqs, (list, tuple)) and all(_int_list(s) for s in seqs)):
            raise _bad(self, "bad_words_token_ids", "must be a list of lists of ints")

    def _restriction_checks(self) -> list[tuple[str, bool, str]]:
        allowed, seqs = self.allowed_token_ids, self.bad_words_token_ids or []
        return [("bad_words", all(w.strip() for w in self.bad_words or []), "must be words (not empty or blank)"),
                ("allowed_token_ids", allowed is None or (len(allowed) > 0 and min(allowed) >= 0),
                 "must be a non-empty list of token ids >= 0"),
                ("bad_words_token_ids", all(s and min(s) >= 0 for s in seqs), "must be non-empty lists of ids >= 0")]

    def _restriction_copies(self) -> dict[str, Any]:
        def copied(value: Any) -> Any:
            return [list(v) if isinstance(v, (list, tuple)) else v for v in value] \
                if isinstance(value, (list, tuple)) else value
        return {name: copied(getattr(self, name)) for name in ("bad_words", "allowed_token_ids", "bad_words_token_ids")}

    def bias_entries(self) -> tuple[list[int], list[float]]:
        """The (token, value) entries the device adds to this request's logits at each sampled token:
        ``logit_bias``; -inf for each bad word of one token; +inf marking each allowed token (a row
        with such marks samples only those tokens: the device bans the rest, ``apply_logit_bias``).
        Bad words of several tokens depend on the tokens before: the host bans them (``host_masked``)."""
        ids, values = list((self.logit_bias or {}).keys()), [float(v) for v in (self.logit_bias or {}).values()]
        banned = sorted({s[0] for s in self.bad_words_token_ids or [] if len(s) == 1})
        allowed = sorted(set(self.allowed_token_ids or ()))
        return ids + banned + allowed, values + [-math.inf] * len(banned) + [math.inf] * len(allowed)

    @property
    def host_masked(self) -> bool:
        """Sampled through a host-filled mask (``engine.structured``): a grammar, or a bad word of
        several tokens (whether it is banned depends on the tokens before)."""
        return self.structured_outputs is not None or any(len(s) > 1 for s in self.bad_words_token_ids or ())

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def effective_temperature(self) -> float:
        """0 for greedy rows, as the sampler reads it (in float32). A temperature past float32's
        largest value is that value: the device divides logits by it, and an infinite one turned a
        grammar's banned (-inf) logits into NaN, from which sampling drew a banned token; at either
        every logit divided is ~0, so the draw is the same (uniform over the eligible tokens)."""
        return 0.0 if self.greedy else min(float(self.temperature), FLOAT32_MAX)

    @property
    def effective_top_k(self) -> int:
        """0 when top-k filtering is off."""
        return max(self.top_k, 0)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


def _bad(params: SamplingParams, name: str, why: str) -> ValueError:
    return ValueError(f"SamplingParams.{name} {why}, got {getattr(params, name)!r}")


def _require_int(params: SamplingParams, name: str) -> None:
    if not _is_int(getattr(params, name)):
        raise _bad(params, name, "must be an int")


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_number(params: SamplingParams, name: str) -> None:
    if not _is_finite(getattr(params, name)):
        raise _bad(params, name, "must be a finite number")
