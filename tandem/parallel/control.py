"""What rank 0's host tells the other ranks: one fixed-size int64 header per message over the
control group. A step's header carries what the followers' hosts need to launch it (step id,
shape, sampler variant, buffer length); the packed inputs themselves follow on the device
(``executors``). Rank 0 sends asynchronously: its host never waits for a follower."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tandem.contract.step import SamplerFlags, StepInputs, StepShape

_SHAPE_WORDS, _FLAG_WORDS = len(dataclasses.fields(StepShape)), len(dataclasses.fields(SamplerFlags))
#: kind, step id, buffer length, then every field of StepShape and SamplerFlags (ints and bools, in
#: declaration order: a field added to either travels without a change here)
HEADER_WORDS = 3 + _SHAPE_WORDS + _FLAG_WORDS


class Kind(enum.IntEnum):
    STEP = 1
    SET_ASYNC = 2
    STOP = 3


@dataclass(frozen=True)
class Message:
    kind: Kind
    step_id: int = 0
    num_words: int = 0  # STEP: packed buffer length; SET_ASYNC: 1 for async, 0 for sync
    shape: StepShape | None = None
    sampler: SamplerFlags | None = None

    @classmethod
    def step(cls, step: StepInputs) -> Message:
        return cls(Kind.STEP, step.step_id, step.data.size, step.shape, step.sampler)

    def encode(self) -> torch.Tensor:
        shape = dataclasses.astuple(self.shape) if self.shape else (0,) * _SHAPE_WORDS
        flags = dataclasses.astuple(self.sampler) if self.sampler else (0,) * _FLAG_WORDS
        return torch.tensor([self.kind, self.step_id, self.num_words, *shape, *flags], dtype=torch.int64)

    @classmethod
    def decode(cls, header: torch.Tensor) -> Message:
        kind, step_id, num_words, *rest = header.tolist()
        return cls(Kind(kind), step_id, num_words, _typed(StepShape, rest[:_SHAPE_WORDS]),
                   _typed(SamplerFlags, rest[_SHAPE_WORDS:]))

    def step_inputs(self) -> StepInputs:
        """A follower's copy of the step: the inputs are a fresh buffer the broadcast from rank 0 fills."""
        return StepInputs(self.step_id, self.shape, self.sampler, np.empty(self.num_words, dtype=np.int64))


def _typed(cls: type, values: list[int]) -> Any:
    """A dataclass of int and bool fields from the header's int64 words."""
    return cls(*(bool(v) if f.type in (bool, "bool") else v for f, v in zip(dataclasses.fields(cls), values)))


class ControlSender:
    """Rank 0: each header is broadcast as an async op; its buffer is reused only once that op is done
    (four back: the followers are never more than two steps behind, the engine's pipeline depth)."""

    RING = 4

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.headers = [torch.zeros(HEADER_WORDS, dtype=torch.int64) for _ in range(self.RING)]
        self.works: list[dist.Work | None] = [None] * self.RING
        self.sent = 0

    def send(self, message: Message) -> None:
        k = self.sent % self.RING
        self.sent += 1
        if self.works[k] is not None:
            self.works[k].wait()
        self.headers[k].copy_(message.encode())
        self.works[k] = dist.broadcast(self.headers[k], src=0, group=self.group, async_op=True)

    def flush(self) -> None:
        for work in self.works:
            if work is not None:
                work.wait()


class ControlReceiver:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.header = torch.zeros(HEADER_WORDS, dtype=torch.int64)

    def recv(self) -> Message:
        dist.broadcast(self.header, src=0, group=self.group)
        return Message.decode(self.header)
