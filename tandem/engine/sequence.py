"""One request's state on the host side of the engine, written only by the scheduler."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.contract.step import request_values
from tandem.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tandem.engine.running import RunningState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class EngineRequest:
    """A validated, tokenized request as the engine core receives it (plain data: it may cross a
    process boundary)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved: the request's own, or drawn for it when it arrived
    max_new_tokens: int  # max_tokens, capped by the room left under max_model_len


class _RowCounter:
    """A counter kept in the running state's array of the same name while the sequence is attached
    to it (running), in the sequence's own ``_<name>`` field otherwise."""

    def __init__(self, array: str) -> None:
        self.array, self.own = array, "_" + array

    def __get__(self, seq: Sequence, owner: type | None = None) -> int:
        state = seq._state
        return getattr(seq, self.own) if state is None else int(getattr(state, self.array)[seq.row])

    def __set__(self, seq: Sequence, value: int) -> None:
        state = seq._state
        if state is None:
            setattr(seq, self.own, value)
        else:
            getattr(state, self.array)[seq.row] = value


@dataclass(eq=False)
class Sequence:
    """Token bookkeeping is optimistic: a token scheduled for sampling counts as *pending* until
    the step that samples it has been processed, so the next step can be scheduled before then.

    While it runs, its counters (``num_computed``, ``num_pending``, ``last_step``, ``num_tokens``)
    live in the scheduler's ``RunningState`` at its row, where a decode step advances a whole batch
    at once; the properties read and write them wherever they are."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    #: prefix caching: hashes of the full blocks of known tokens, computed once (``prefix_cache``)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    #: prefix caching: its leading blocks up to here are registered (or were found) in the cache
    num_registered_blocks: int = field(default=0, repr=False)
    row: int | None = None  # this sequence's row in the device's next-token table while it runs
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    prompt_len: int = field(init=False)
    prompt_logprobs_next: int = 0  # prompt positions before this have had their successor's logprobs sent
    #: the constant per-sample step fields of this request (see ``step.request_values``)
    step_values: tuple[tuple[int, ...], tuple[float, ...]] = field(init=False, repr=False)
    bias_ids: np.ndarray = field(init=False, repr=False)  # its SamplingParams.bias_entries(), as arrays
    bias_values: np.ndarray = field(init=False, repr=False)
    min_tokens_ban: np.ndarray = field(init=False, repr=False)  # stop ids banned before min_tokens (scheduler)
    #: host-masked requests (``SamplingParams.host_masked``): their ``engine.structured.rules.TokenRules``
    rules: Any = field(default=None, init=False, repr=False)
    #: speculative decoding: the proposals its newest planned step verifies (while ``RunningState.spec_lag``
    #: says that step is not processed yet, the proposer continues them: ``Speculation.propose``)
    proposed: list[int] = field(default_factory=list, init=False, repr=False)
    # the counters while not attached to a running state
    _computed: int = field(default=0, init=False, repr=False)  # tokens whose K/V is written or being written
    _pending: int = field(default=0, init=False, repr=False)
    _last_step: int = field(default=-1, init=False, repr=False)  # newest step that includes this sequence
    _state: RunningState | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)
        self.step_values = request_values(self)
        ids, values = self.params.bias_entries()  # logit_bias, banned (-inf) and allowed (+inf) tokens
        self.bias_ids = np.array(ids, np.int64)
        self.bias_values = np.array(values, np.float64)
        self.min_tokens_ban = np.zeros(0, np.int64)

    # --- counters: in the running state while attached --------------------------------------
    num_computed = _RowCounter("computed")  # type: ignore[assignment]
    last_step = _RowCounter("last_step")  # type: ignore[assignment]

    def attach(self, state: RunningState, row: int) -> None:
        """Start running in ``row``: the counters move to ``state``."""
        self.row = row
        state.attach(self, row, self._computed, self.prompt_len + len(self.output_token_ids) + self._pending,
                     self._pending, self._last_step)
        self._state = state

    def detach(self) -> None:
        """Stop running: the counters come back here; the row no longer belongs to this sequence."""
        state, row = self._state, self.row
        if state is None:
            return
        self._computed, self._pending = int(state.computed[row]), int(state.pending[row])
        self._last_step = int(state.last_step[row])
        state.tag[row] = 0
        self._state = None

    @property
    def num_pending(self) -> int:
        return self._pending if self._state is None else int(self._state.pending[self.row])

    @num_pending.setter
    def num_pending(self, value: int) -> None:
        if self._state is None:
            self._pending = value
        else:
            state, row = self._state, self.row
            state.tokens[row] += value - state.pending[row]
            state.pending[row] = value

    def append_output(self, token: int) -> None:
        """A pending token came back: it is known now (the number of tokens does not change)."""
        self.output_token_ids.append(token)
        if self._state is None:
            self._pending -= 1
        else:
            self._state.pending[self.row] -= 1
            self._state.last_token[self.row] = token

    @property
    def spec_lag(self) -> bool:
        """Whether its newest planned step verifies proposals and is not processed yet."""
        return self._state is not None and bool(self._state.spec_lag[self.row])

    @spec_lag.setter
    def spec_lag(self, value: bool) -> None:
        if self._state is not None:
            self._state.spec_lag[self.row] = value

    @property
    def has_bias(self) -> bool:
        """Whether its sampled rows may need logit-bias entries (its bias, or min_tokens bans)."""
        return bool(self.bias_ids.size) or self.params.min_tokens > 0

    @classmethod
    def from_request(cls, req: EngineRequest) -> Sequence:
        return cls(req.request_id, list(req.prompt_token_ids), req.params, req.seed, req.max_new_tokens)

    @property
    def num_tokens(self) -> int:
        """Prompt + output + pending."""
        if self._state is None:
            return self.prompt_len + len(self.output_token_ids) + self._pending
        return int(self._state.tokens[self.row])

    @property
    def num_generated(self) -> int:
        return self.num_tokens - self.prompt_len

    @property
    def done_scheduling(self) -> bool:
        """All tokens it may produce are produced or in flight."""
        return self.num_generated >= self.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def known_tokens(self, start: int, end: int) -> list[int]:
        """Known tokens [start, end) of prompt + output (fewer where they are still pending), without
        concatenating the two lists: a decode chunk of a long sequence would copy all of it."""
        p = self.prompt_len
        if end <= p:
            return self.prompt_token_ids[start:end]
        out = self.output_token_ids[max(0, start - p):end - p]
        return self.prompt_token_ids[start:] + out if start < p else out

    def token_at(self, index: int) -> int | None:
        """The token at ``index`` of prompt+output, or None while it is still pending on the device."""
        if index < self.prompt_len:
            return self.prompt_token_ids[index]
        index -= self.prompt_len
        return self.output_token_ids[index] if index < len(self.output_token_ids) else None
