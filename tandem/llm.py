"""The offline Python API, in vLLM's shape: ``LLM(model).generate(prompts, SamplingParams(...))``.

Prompts are vLLM's too (``tandem.inputs``): strings, ``TextPrompt`` / ``TokensPrompt`` dicts, token-id
lists. With no ``sampling_params`` a request takes ``get_default_sampling_params()``: the checkpoint's
generation_config.json defaults under ``generation_config="auto"`` (vLLM's rule), else SamplingParams'."""
from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from tandem.config import EngineConfig
from tandem.engine.fanout import fan_in, fan_out
from tandem.engine.heap import freeze
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.startup_summary import startup_summary
from tandem.engine.sequence import EngineRequest
from tandem.inputs import PromptType, parse_prompts
from tandem.generation_defaults import sampling_defaults
from tandem.outputs import RequestOutput
from tandem.runtime import create_worker
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import ChatOptions

PromptList = PromptType | Seq[PromptType]

log = logging.getLogger(__name__)

def create_engine(config: EngineConfig) -> LLMEngine:
    """A device worker for ``config`` and the in-process engine around it (names resolved to local
    folders first: ``EngineConfig.resolved``)."""
    config = config.resolved()
    start = time.perf_counter()
    engine = LLMEngine(config, create_worker(config))
    log.info("%s", startup_summary(engine.worker.info, time.perf_counter() - start))
    # start-up objects (weights' metadata, tokenizer, graphs) live as long as the engine: out of the
    # garbage collector's scans, so the step loop's collections only look at what the loop made
    gc.collect()
    freeze()
    return engine


class LLM:
    """``LLM(model, **options)``: the options are ``EngineConfig``'s fields (README, "Engine options"),
    vLLM's names (``tokenizer``, ``revision``, ``trust_remote_code``, ``generation_config``, ...); an
    unknown one is a ValueError naming it."""

    def __init__(self, model: str, **options: Any) -> None:
        self.llm_engine = create_engine(EngineConfig.from_options(model, **options))
        config = self.llm_engine.config
        self._defaults = sampling_defaults(config.model, config.generation_config)
        self._ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        """``llm_engine`` (vLLM's name), under tandem's earlier one."""
        return self.llm_engine

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    def get_tokenizer(self):
        """The tokenizer (None for a checkpoint without one): vLLM's accessor."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without sampling_params gets: generation_config.json's defaults (temperature,
        top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens) under
        ``generation_config="auto"``, else SamplingParams' own."""
        return SamplingParams(**self._defaults)

    def generate(self, prompts: PromptList, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. Every prompt is checked
        before any runs, so an invalid one raises ``ValueError`` and nothing is generated."""
        items = parse_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _normalise_params(sampling_params, len(items))
        parents, requests = [], []
        for (text, ids), p in zip(items, params):
            children = fan_out(str(next(self._ids)), p)  # n > 1: n requests, one completion each
            requests += [(self.engine.validate_request(cid, text, cp, ids), text) for cid, cp in children]
            parents.append([cid for cid, _ in children])
        results = self._run(requests, use_tqdm)
        return [results[ids[0]] if len(ids) == 1 else fan_in(ids[0].rsplit("-", 1)[0], [results[c] for c in ids])
                for ids in parents]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             documents: list[dict[str, str]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the chat template (the checkpoint's, the engine's ``chat_template``, or this call's) and
        generate; the keywords are vLLM's (``chat_template_kwargs``: more template variables, e.g.
        ``{"enable_thinking": False}``)."""
        if self.llm_engine.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        options = ChatOptions(add_generation_prompt, continue_final_message, chat_template, documents, tools,
                              dict(chat_template_kwargs or {}))
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        ids = [self.llm_engine.tokenizer.apply_chat_template(conv, options) for conv in conversations]
        return self.generate(ids, sampling_params, use_tqdm)

    def _run(self, requests: list[tuple[EngineRequest, str | None]], use_tqdm: bool) -> dict[str, RequestOutput]:
        for request, text in requests:
            self.engine.add_validated(request, text)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=sum(r.max_new_tokens for r, _ in requests), desc="generate", unit="tok",
                   disable=not use_tqdm)
        counted = self.engine.num_generated_tokens
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                bar.update(self.engine.num_generated_tokens - counted)
                counted = self.engine.num_generated_tokens
        except BaseException:
            self.engine.abort_all()  # the engine stays usable after an interruption
            raise
        finally:
            bar.total = bar.n  # requests that stopped early leave the budget unused
            bar.close()
        return results


def _normalise_params(params: SamplingParams | Seq[SamplingParams], n: int) -> list[SamplingParams]:
    """Checked copies (fields may have changed since construction) before ``n`` fans them out."""
    if isinstance(params, SamplingParams):
        return [params.checked_copy()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    bad = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
    if bad:
        raise ValueError(f"sampling_params must be SamplingParams, got {bad[0]}")
    return [p.checked_copy() for p in params]
