"""The in-process engine: input processing -> engine core -> output processing, one call per step.

``LLM`` drives it to completion; a caller that wants the loop itself uses ``add_request``,
``abort_request`` and ``step``. The worker (device side) is built outside and handed in
(``tandem.llm.create_engine``): the host side never touches the device directly."""
from __future__ import annotations

import gc

from tandem.config import EngineConfig
from tandem.contract.worker import Worker
from tandem.engine.core import EngineCore
from tandem.engine.heap import freeze
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.processor import InputProcessor
from tandem.engine.sequence import EngineRequest
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.model.sources import load_tokenizer, resolve_model_config


class LLMEngine:
    def __init__(self, config: EngineConfig, worker: Worker) -> None:
        self.config = config
        self.model_config = resolve_model_config(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, config.chat_template)
        self.worker = worker
        self.max_model_len = worker.info.max_model_len
        self.processor = InputProcessor(self.model_config, self.tokenizer, self.max_model_len, config)
        self.core = EngineCore(config, worker, frozenset(self.model_config.eos_token_ids))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_generated_tokens = 0  # over the engine's life (progress bars read it)
        gc.collect()
        freeze()  # start-up objects leave the collector's view: full collections stay short in the loop

    # --- requests --------------------------------------------------------------------------
    def validate_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                         prompt_token_ids: list[int] | None = None) -> EngineRequest:
        """Check a request without touching engine state (so a batch can be checked up front)."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.processor.process(request_id, prompt, params, prompt_token_ids)

    def add_validated(self, request: EngineRequest, prompt: str | None = None, stream: bool = False) -> None:
        self.processor.assign_seed(request)
        self.core.add_request(request)
        self.output_processor.add(request.request_id, prompt, request.prompt_token_ids, request.params, stream)

    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, stream: bool = False) -> None:
        """Queue a request. ``step()`` returns its output when it finishes, and after every step
        that adds a token if ``stream`` is set. Raises ValueError (and changes nothing) if invalid."""
        self.add_validated(self.validate_request(request_id, prompt, params, prompt_token_ids), prompt, stream)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.finish_requests([request_id])
        return self.output_processor.abort(request_id)

    def abort_all(self) -> None:
        """After an interruption: drain the device, end every request; the engine stays usable."""
        for request_id in self.core.abort_all():
            self.output_processor.abort(request_id)
        for request_id in list(self.output_processor.requests):
            self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # --- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan and launch one step; return outputs (finished requests, and streaming ones that got a
        token) of whichever step completed meanwhile."""
        deltas = self.core.step()
        self.num_generated_tokens += len(deltas.token_ids)
        processed = self.output_processor.process(deltas)
        if deltas.errors:  # a request the core could not run (a grammar that does not compile) fails the call
            raise ValueError("; ".join(f"request {rid!r}: {why}" for rid, why in deltas.errors.items()))
        if processed.stopped:
            self.core.finish_requests(processed.stopped, "stop")
        return processed.outputs

    def shutdown(self) -> None:
        self.core.shutdown()
