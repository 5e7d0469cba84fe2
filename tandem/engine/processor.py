"""Input processing: validate a request and tokenize its prompt, changing nothing in the engine, so
a bad request fails alone with a clear ``ValueError`` (and a batch can be checked up front)."""
from __future__ import annotations

import random

import numpy as np

from tandem.config import EngineConfig
from tandem.engine.limits import check_representable
from tandem.engine.sequence import EngineRequest
from tandem.engine.stop_strings import check_stop_strings
from tandem.model.model_config import ModelConfig
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import Tokenizer


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer | None, max_model_len: int,
                 config: EngineConfig) -> None:
        self.vocab_size = model_config.vocab_size
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_stop_strings = config.max_stop_strings
        self.max_stop_string_length = config.max_stop_string_length
        self.max_logprobs = config.max_logprobs
        self._seed_rng = random.Random(config.seed)
        self.eos_token_ids = frozenset(model_config.eos_token_ids)

    def process(self, request_id: str, prompt: str | None, params: SamplingParams,
                prompt_token_ids: list[int] | None = None) -> EngineRequest:
        """A validated request; its seed is resolved later, by ``assign_seed`` when it is added."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params = params.checked_copy()  # fields changed since construction are checked here, once
        if params.stop_strings and (not params.detokenize or self.tokenizer is None):
            raise ValueError("stop strings need detokenize=True and a model with a tokenizer")
        check_stop_strings(params.stop_strings, self.max_stop_strings, self.max_stop_string_length)
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.max_logprobs:
                raise ValueError(f"SamplingParams.{name}={getattr(params, name)} is above max_logprobs="
                                 f"{self.max_logprobs} (--max-logprobs)")
        if params.structured_outputs is not None:  # a bad spec fails here; it compiles in the engine core
            from tandem.engine.structured.compiler import check_request

            check_request(params.structured_outputs, self.tokenizer is not None)
        self._tokenize_bad_words(params)
        self._tokenize_reasoning(params)
        self._check_allowed_tokens(params)
        for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids),
                          ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("bad_words", [t for s in params.bad_words_token_ids or () for t in s])):
            outside = [t for t in ids if t >= self.vocab_size]  # a stop id is banned until min_tokens: an index
            if outside:
                raise ValueError(f"SamplingParams.{name} has token ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"{outside[:5]}")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(context_overflow(self.max_model_len, len(ids), params.max_tokens))
        max_new = room if params.max_tokens is None else params.max_tokens
        seed = -1 if params.seed is None else params.seed  # -1: drawn by assign_seed when added
        request = EngineRequest(request_id, ids, params, seed, max_new)
        check_representable(request)
        return request

    def _tokenize_bad_words(self, params: SamplingParams) -> None:
        """``bad_words`` as token sequences, on the request's own copy: each word alone and after a
        space (how a tokenizer writes a word inside a text). A word of one token is banned by the
        device; one of several tokens by the host mask, where the output ends with the rest of it."""
        if not params.bad_words:
            return
        if self.tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs a model with a tokenizer")
        forms = {tuple(self.tokenizer.encode(form, add_special_tokens=False))
                 for word in params.bad_words for form in (word.lstrip(), " " + word.lstrip())}
        forms |= {tuple(s) for s in params.bad_words_token_ids or ()}
        singles = {ids[0] for ids in forms if len(ids) == 1}
        # a longer form ending in a banned token is banned already (" e" when "e" is one token)
        params.bad_words_token_ids = [list(ids) for ids in sorted(forms) if ids and (len(ids) == 1
                                                                                    or ids[-1] not in singles)]
        if params.allowed_token_ids is not None and set(params.allowed_token_ids) <= singles:
            raise ValueError("SamplingParams.bad_words bans every token of allowed_token_ids")

    def _tokenize_reasoning(self, params: SamplingParams) -> None:
        """The reasoning tags of ``structured_outputs`` as tokens: the opening one must be one token
        (it is allowed as the output's first token), the closing one any tokens."""
        spec = params.structured_outputs
        if spec is None or spec.reasoning_end is None:
            return
        if self.tokenizer is None:
            raise ValueError("SamplingParams.structured_outputs.reasoning_end needs a model with a tokenizer")
        end = self.tokenizer.encode(spec.reasoning_end, add_special_tokens=False)
        start = None
        if spec.reasoning_start is not None:
            ids = self.tokenizer.encode(spec.reasoning_start, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"SamplingParams.structured_outputs.reasoning_start {spec.reasoning_start!r} is "
                                 f"{len(ids)} tokens {ids[:8]}; it must be one token")
            start = ids[0]
        spec.reasoning_ids = (start, tuple(end))

    def _check_allowed_tokens(self, params: SamplingParams) -> None:
        """A row must keep a token it may sample: before min_tokens, the stop tokens (and EOS) are
        banned too, so allowed tokens that are all stops would leave none. (With a grammar, which
        tokens it allows is known only as it runs: the host ends a request left with none.)"""
        if params.allowed_token_ids is None or not params.min_tokens:
            return
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        if set(params.allowed_token_ids) <= stops:
            raise ValueError("SamplingParams.allowed_token_ids are all stop tokens, which min_tokens bans: "
                             "no token would be left to sample")

    def assign_seed(self, request: EngineRequest) -> None:
        """Unseeded requests draw their seed when added: reproducible for an engine seed and an order."""
        if request.params.seed is None:
            request.seed = self._seed_rng.getrandbits(63)

    def encode_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        if not isinstance(prompt_token_ids, (list, tuple)):
            raise ValueError(f"prompt token ids must be a list of ints, got {type(prompt_token_ids).__name__}")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt is empty")
        if not _valid_token_ids(ids, self.vocab_size):
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "no room left to generate")
        return ids


def context_overflow(max_model_len: int, prompt_tokens: int, max_tokens: int) -> str:
    """The one wording of the context rule, offline and in the server: prompt + max_tokens must fit."""
    return (f"this model's maximum context length is {max_model_len} tokens, but the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} completion tokens; "
            "shorten the prompt or lower max_tokens")


def _valid_token_ids(ids: list, vocab: int) -> bool:
    """Every id an int (not a bool) in [0, vocab). Plain ints, the usual case, are checked in C
    (a 32K-token prompt took 20 ms element by element); anything else element by element."""
    if set(map(type, ids)) == {int}:
        try:
            arr = np.fromiter(ids, np.int64, len(ids))
        except OverflowError:
            return False
        return bool(arr.min() >= 0 and arr.max() < vocab)
    return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)
