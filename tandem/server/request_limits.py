"""Per-request limits: how much one API request may ask of the engine. They are checked from the
body's counts alone (prompts, ``n``), before a prompt is tokenized or a choice is built, so a request
over them costs the server nothing but its parsing (400 naming the field and the limit)."""
from __future__ import annotations

from dataclasses import dataclass

from tandem.server.defaults import DEFAULT_MAX_N, DEFAULT_MAX_PROMPTS_PER_REQUEST, DEFAULT_MAX_SEQS_PER_REQUEST
from tandem.server.errors import APIError

#: the protocol's own cap on ``n`` (a larger value is a validation error before any limit applies)
PROTOCOL_MAX_N = 1024


@dataclass(frozen=True)
class RequestLimits:
    max_prompts: int = DEFAULT_MAX_PROMPTS_PER_REQUEST  # --max-prompts-per-request
    max_n: int = DEFAULT_MAX_N  # --max-n
    max_seqs: int = DEFAULT_MAX_SEQS_PER_REQUEST  # --max-seqs-per-request: prompts x n
    default_max_tokens: int | None = None  # --default-max-tokens; None: the rest of the context (vLLM's rule)
    trust_request_chat_template: bool = False  # --trust-request-chat-template: requests may bring a template

    def __post_init__(self) -> None:
        for flag, value in (("--max-prompts-per-request", self.max_prompts), ("--max-n", self.max_n),
                            ("--max-seqs-per-request", self.max_seqs), ("--default-max-tokens", self.default_max_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_n > PROTOCOL_MAX_N:
            raise ValueError(f"--max-n must be <= {PROTOCOL_MAX_N} (the API's own cap on n), got {self.max_n}")

    def sequences(self, prompts: int, n: int, capacity: int | None) -> int:
        """The engine requests (prompts x n) a request creates, or a 400 naming the field over a limit.
        ``capacity`` is the most the server ever holds at once (--max-num-seqs plus --max-num-waiting):
        a request larger than that would be refused with 429 forever, so it is a 400 too."""
        if prompts > self.max_prompts:
            raise APIError(400, f"prompt: {prompts} prompts in one request, more than this server's limit of "
                                f"{self.max_prompts} (--max-prompts-per-request)", "prompt")
        if n > self.max_n:
            raise APIError(400, f"n: {n} choices per prompt, more than this server's limit of {self.max_n} "
                                "(--max-n)", "n")
        seqs, param = prompts * n, "n" if n > 1 else "prompt"
        if seqs > self.max_seqs:
            raise APIError(400, f"{param}: {prompts} prompt(s) x n = {n} make {seqs} sequences, more than this "
                                f"server's limit of {self.max_seqs} per request (--max-seqs-per-request)", param)
        if capacity is not None and seqs > capacity:
            raise APIError(400, f"{param}: {prompts} prompt(s) x n = {n} make {seqs} sequences, more than this "
                                f"server ever holds at once ({capacity}: --max-num-seqs plus --max-num-waiting)",
                           param)
        return seqs

    def max_tokens(self, room: int) -> int:
        """What a request that names no ``max_tokens`` gets, with ``room`` tokens of context left after
        its prompt: all of them, or --default-max-tokens if that is fewer."""
        return room if self.default_max_tokens is None else min(self.default_max_tokens, room)
