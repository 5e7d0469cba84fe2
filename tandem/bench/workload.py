"""What a benchmark runs: random prompts from a fixed seed, lengths fixed or drawn uniformly from a
range, optionally all starting with the same tokens (a shared system prompt, for prefix caching), and
arrival times (all at once, or a Poisson process at a given rate)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.sampling_params import SamplingParams, StructuredOutputsParams

#: ``--structured-output json``: every request's output follows this schema (a record whose free
#: text lets a random model's output run on: the host's mask work is measured on long outputs)
BENCH_JSON_SCHEMA = {"type": "object",
                     "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                    "tags": {"type": "array", "items": {"type": "string"}},
                                    "active": {"type": "boolean"}},
                     "required": ["id", "name", "tags", "active"]}
STRUCTURED_OUTPUTS = ("json",)  # what --structured-output takes


@dataclass(frozen=True)
class LengthRange:
    lo: int
    hi: int

    @classmethod
    def parse(cls, spec: str | int) -> LengthRange:
        """``256`` or ``"256"`` (fixed) or ``"16:4096"`` (uniform, both ends included)."""
        parts = str(spec).split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            lo = hi = None
        if lo is None or not 1 <= lo <= hi:
            raise ValueError(f"a length must be N or MIN:MAX with 1 <= MIN <= MAX, got {spec!r}")
        return cls(lo, hi)

    @property
    def fixed(self) -> bool:
        return self.lo == self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.fixed else f"{self.lo}:{self.hi}"


@dataclass
class Workload:
    num_requests: int = 32
    prompt_len: LengthRange = field(default_factory=lambda: LengthRange(256, 256))
    max_tokens: LengthRange = field(default_factory=lambda: LengthRange(1024, 1024))
    seed: int = 0
    temperature: float = 0.0
    request_rate: float | None = None  # requests per second, Poisson arrivals; None: all at time 0
    logprobs: int | None = None  # every request asks for its tokens' logprobs and this many alternatives
    shared_prefix_len: int = 0  # every prompt starts with the same this many tokens
    presence_penalty: float = 0.0  # every request's penalties (the sampling stage's penalty path)
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    structured_output: str | None = None  # "json": every request constrained by BENCH_JSON_SCHEMA
    # > 0: every prompt is its first this many tokens repeated to its length (text that n-gram
    # speculation can look up; random prompts never repeat)
    repeat_span: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.shared_prefix_len <= self.prompt_len.lo:
            raise ValueError(f"shared_prefix_len must be in [0, the shortest prompt length {self.prompt_len.lo}], "
                             f"got {self.shared_prefix_len}")
        if not 0 <= self.repeat_span <= self.prompt_len.lo:
            raise ValueError(f"repeat_span must be in [0, the shortest prompt length {self.prompt_len.lo}], "
                             f"got {self.repeat_span}")
        if self.structured_output not in (None, *STRUCTURED_OUTPUTS):
            raise ValueError(f"structured_output must be one of {STRUCTURED_OUTPUTS}, got {self.structured_output!r}")

    def describe(self) -> str:
        rate = f", {self.request_rate} req/s" if self.request_rate else ""
        shared = f", {self.shared_prefix_len} of them shared" if self.shared_prefix_len else ""
        extra = f", logprobs={self.logprobs}" if self.logprobs is not None else ""
        if self.penalised:
            extra += (f", penalties presence={self.presence_penalty} frequency={self.frequency_penalty} "
                      f"repetition={self.repetition_penalty}")
        if self.structured_output:
            extra += f", structured output {self.structured_output} (a fixed schema)"
        if self.repeat_span:
            extra += f", prompts repeating a {self.repeat_span}-token span"
        return (f"{self.num_requests} requests x ({self.prompt_len} prompt{shared} + {self.max_tokens} new "
                f"tokens){rate}{extra}")

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def record(self) -> dict:
        return {"num_requests": self.num_requests, "prompt_len": str(self.prompt_len),
                "max_tokens": str(self.max_tokens), "seed": self.seed, "temperature": self.temperature,
                "request_rate": self.request_rate, "logprobs": self.logprobs,
                "shared_prefix_len": self.shared_prefix_len, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                "structured_output": self.structured_output, "repeat_span": self.repeat_span}


@dataclass
class BenchRequest:
    prompt: list[int]
    max_tokens: int
    arrival_s: float  # seconds after the start


def make_requests(w: Workload, vocab_size: int) -> list[BenchRequest]:
    gen = torch.Generator().manual_seed(w.seed)
    n = w.num_requests
    if w.prompt_len.fixed:  # one draw for all: the prompts of every earlier fixed-length run
        prompts = torch.randint(0, vocab_size, (n, w.prompt_len.lo), generator=gen).tolist()
    else:
        lens = torch.randint(w.prompt_len.lo, w.prompt_len.hi + 1, (n,), generator=gen).tolist()
        prompts = [torch.randint(0, vocab_size, (k,), generator=gen).tolist() for k in lens]
    shared = prompts[0][:w.shared_prefix_len]  # the others' own draws are the same as without sharing
    for p in prompts[1:]:
        p[:len(shared)] = shared
    if w.repeat_span:
        prompts = [(p[:w.repeat_span] * -(-len(p) // w.repeat_span))[:len(p)] for p in prompts]
    rng = np.random.default_rng(w.seed)
    outs = rng.integers(w.max_tokens.lo, w.max_tokens.hi + 1, n).tolist()
    arrivals = np.cumsum(rng.exponential(1.0 / w.request_rate, n)) if w.request_rate else np.zeros(n)
    return [BenchRequest(p, o, float(a)) for p, o, a in zip(prompts, outs, arrivals)]


def bench_params(w: Workload, max_tokens: int) -> SamplingParams:
    # EOS ignored and no detokenization: every request generates exactly its budget of tokens (with
    # structured output, unless its grammar completes first: a complete grammar ends the request)
    structured = StructuredOutputsParams(json=BENCH_JSON_SCHEMA) if w.structured_output == "json" else None
    return SamplingParams(temperature=w.temperature, seed=w.seed if w.temperature > 0 else None,
                          max_tokens=max_tokens, ignore_eos=True, detokenize=False, logprobs=w.logprobs,
                          presence_penalty=w.presence_penalty, frequency_penalty=w.frequency_penalty,
                          repetition_penalty=w.repetition_penalty, structured_outputs=structured)
