"""From the engine core's token deltas to what callers get: text (detokenized incrementally), stop
strings, and ``RequestOutput`` objects. It runs wherever the tokenizer lives: in-process under
``LLMEngine``, or in the API process of the server; requests it stops by their text must then be
finished in the core (``ProcessedStep.stopped``).

A streamed output never shows text that a stop string could still remove: while a request runs, the
end of its text that is the beginning of a stop string is held back (the final text is unchanged),
so each streamed text is a prefix of the next and of the final one. Stop strings are matched by an
automaton fed only each step's new characters (``stop_strings``), so a step costs what it adds."""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.logprob_output import LogprobChunk, LogprobDecoder
from tandem.engine.scheduler import StepDeltas
from tandem.engine.stop_strings import StopScanner, automaton_for
from tandem.outputs import CompletionOutput, LogprobSeries, RequestOutput, TokenIds, TokenLogprobs
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import Tokenizer


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    detokenizer: IncrementalDetokenizer | None
    stops: StopScanner | None  # set when the request has stop strings (and a detokenizer)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: LogprobSeries | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    streamed: int = -1  # tokens in its last streamed output (-1: none yet)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)  # the first token has none

    def extend(self, new_text: str) -> bool:
        """Append text; True if it completes a stop string: the text is cut there and finished."""
        self.text += new_text
        hit = self.stops.feed(new_text) if new_text and self.stops is not None else None
        if hit is None:
            return False
        self.stop_reason = self.text[hit.start:hit.start + hit.length]
        self.text = self.text[:hit.start + hit.length if self.params.include_stop_str_in_output else hit.start]
        self.finish_reason = "stop"
        return True

    def due(self, interval: int) -> bool:
        """Whether a running stream gets an output now: its first token, then each ``interval`` new ones
        (an output holds everything so far, so the ones skipped lose nothing)."""
        tokens = len(self.token_ids)
        if self.streamed >= 0 and tokens - self.streamed < interval:
            return False
        self.streamed = tokens
        return True

    def output(self) -> RequestOutput:
        done = self.finish_reason is not None
        text = self.text
        if not done and self.stops is not None and not self.params.include_stop_str_in_output:
            # with the stop string kept in the output, the cut falls after it: nothing to hold back
            text = text[:len(text) - self.stops.pending]
        logprobs = None if self.logprobs is None else self.logprobs.view()
        # a finished request's list is handed over (its state is dropped); a running one's is shared
        token_ids = self.token_ids if done else TokenIds(self.token_ids, len(self.token_ids))
        completion = CompletionOutput(0, text, token_ids, self.finish_reason, logprobs, self.stop_reason)
        prompt_logprobs = None if self.prompt_logprobs is None else list(self.prompt_logprobs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [completion], done,
                             prompt_logprobs=prompt_logprobs)


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput]  # finished requests, and streaming ones that got a token
    stopped: list[str]  # requests a stop string ended here: the core must finish them too


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, stream_interval: int = 1) -> None:
        """``stream_interval``: new tokens a running stream's outputs are apart (its first and its last
        come regardless); each output costs its consumer a wake-up and, in the server, an event."""
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.requests: dict[str, _RequestState] = {}
        self.logprob_decoder = LogprobDecoder(tokenizer)

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            stream: bool) -> None:
        detok = (IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                 if params.detokenize and self.tokenizer is not None else None)
        stops = StopScanner(automaton_for(params.stop_strings)) if detok is not None and params.stop_strings else None
        state = _RequestState(request_id, prompt, prompt_token_ids, params, stream, detok, stops)
        if params.logprobs is not None:
            state.logprobs = LogprobSeries(self.logprob_decoder.text)
        self.requests[request_id] = state

    def process(self, deltas: StepDeltas) -> ProcessedStep:
        touched: dict[str, _RequestState] = {}
        stopped = []
        self._add_prompt_logprobs(deltas)
        requests = self.requests
        for rid, token in zip(deltas.token_request_ids, deltas.token_ids):
            state = requests.get(rid)
            if state is None or state.finish_reason is not None:
                # ended already (a stop string) while the core ran ahead, or earlier in this step's
                # tokens for it (speculative decoding brings several): what follows is dropped
                continue
            touched[rid] = state
            state.token_ids.append(token)
            if state.detokenizer is not None and self._detokenize(state, token):
                stopped.append(rid)
        self._add_logprobs(deltas)
        for rid, reason in deltas.finished.items():
            state = requests.get(rid)
            if state is not None:
                touched[rid] = state
                self._finish(state, reason)
        outputs = []
        for rid, state in touched.items():
            if state.finish_reason is not None:
                del requests[rid]
                outputs.append(state.output())
            elif state.stream and state.due(self.stream_interval):
                outputs.append(state.output())
        return ProcessedStep(outputs, stopped)

    def _add_logprobs(self, deltas: StepDeltas) -> None:
        """Entries come in token order within each request, as the tokens do."""
        entries = deltas.logprobs
        if not len(entries):
            return
        chunk = LogprobChunk(entries)
        for j, rid in enumerate(entries.request_ids):
            state = self.requests.get(rid)
            # one entry per token kept: none for the tokens after a stop string within the step
            if state is not None and state.logprobs is not None and len(state.logprobs) < len(state.token_ids):
                state.logprobs.add(chunk, j)

    def _add_prompt_logprobs(self, deltas: StepDeltas) -> None:
        entries = deltas.prompt_logprobs
        for i, (rid, position) in enumerate(zip(entries.request_ids, entries.index)):
            state = self.requests.get(rid)
            if state is not None and state.prompt_logprobs is not None:
                state.prompt_logprobs[position] = self.logprob_decoder.entry(entries, i)

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self._finish(state, "abort")
        return state.output()

    def _detokenize(self, state: _RequestState, token: int) -> bool:
        """Extend the text by an appended token; True if a stop string ends the request here."""
        return state.extend(state.detokenizer.add([token]))

    def _finish(self, state: _RequestState, reason: str) -> None:
        if state.finish_reason is not None:
            return  # a stop string ended it first
        state.finish_reason = reason
        if reason == "stop" and state.token_ids and state.token_ids[-1] in state.params.stop_token_ids:
            state.stop_reason = state.token_ids[-1]  # a stop token (EOS, unless listed, leaves None)
        if state.detokenizer is not None:
            state.extend(state.detokenizer.flush())
