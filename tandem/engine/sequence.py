"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tandem.sampling_params import SamplingParams
from tandem.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token bookkeeping is optimistic: a token scheduled for sampling counts as *pending* until
    the step that samples it has been processed, so the next step can be scheduled before then."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_pending: int = 0
    num_computed: int = 0  # tokens whose K/V is written, or will be by a launched step
    block_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # row in the device table of last sampled tokens
    last_step: int = -1  # newest step that includes this sequence
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    detokenizer: IncrementalDetokenizer | None = None
    num_preemptions: int = 0
    stream: bool = False  # emit an output every step, not only at the end
    prompt_len: int = field(init=False)
    sampling_row: tuple[float, float, float, int] = field(init=False)  # as the batch builder packs it

    def __post_init__(self) -> None:
        p = self.params
        self.prompt_len = len(self.prompt_token_ids)
        self.sampling_row = (0.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.effective_top_k)

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
