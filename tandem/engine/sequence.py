"""One request's state on the host side of the engine, written only by the scheduler."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.step import request_values
from tandem.sampling_params import SamplingParams


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


@dataclass(eq=False)
class Sequence:
    """Token bookkeeping is optimistic: a token scheduled for sampling counts as *pending* until
    the step that samples it has been processed, so the next step can be scheduled before then."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    num_pending: int = 0
    num_computed: int = 0  # tokens whose K/V is written, or will be by a launched step
    block_ids: list[int] = field(default_factory=list)
    #: prefix caching: hashes of the full blocks of known tokens, computed once (``prefix_cache``)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    row: int | None = None  # this sequence's row in the device's next-token table while it runs
    last_step: int = -1  # newest step that includes this sequence
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    prompt_len: int = field(init=False)
    prompt_logprobs_next: int = 0  # prompt positions before this have had their successor's logprobs sent
    #: the constant per-sample step fields of this request (see ``step.request_values``)
    step_values: tuple[tuple[int, ...], tuple[float, ...]] = field(init=False, repr=False)
    bias_ids: np.ndarray = field(init=False, repr=False)  # the request's logit_bias, as arrays
    bias_values: np.ndarray = field(init=False, repr=False)
    min_tokens_ban: np.ndarray = field(init=False, repr=False)  # stop ids banned before min_tokens (scheduler)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)
        self.step_values = request_values(self)
        bias = self.params.logit_bias or {}
        self.bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
        self.bias_values = np.fromiter(bias.values(), np.float64, len(bias))
        self.min_tokens_ban = np.zeros(0, np.int64)

    @property
    def has_bias(self) -> bool:
        """Whether its sampled rows may need logit-bias entries (its bias, or min_tokens bans)."""
        return bool(self.bias_ids.size) or self.params.min_tokens > 0

    @classmethod
    def from_request(cls, req: EngineRequest) -> Sequence:
        return cls(req.request_id, list(req.prompt_token_ids), req.params, req.seed, req.max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    @property
    def done_scheduling(self) -> bool:
        """All tokens it may produce are produced or in flight."""
        return self.num_generated >= self.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def token_at(self, index: int) -> int | None:
        """The token at ``index`` of prompt+output, or None while it is still pending on the device."""
        if index < self.prompt_len:
            return self.prompt_token_ids[index]
        index -= self.prompt_len
        return self.output_token_ids[index] if index < len(self.output_token_ids) else None
