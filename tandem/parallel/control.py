"""What rank 0's host tells the other ranks: one fixed-size int64 header per message over the
control group. A step's header carries what the followers' hosts need to launch it (step id,
shape, sampler variant, buffer length); the packed inputs themselves follow on the device
(``executors``). A step's grammar mask (structured output, host token rules) follows its header on
the control group itself: every rank samples, and the tokens must be the same everywhere (each
rank's next step reads its own sampled tokens). Rank 0 sends asynchronously: its host never waits
for a follower."""
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
    MASK = 4  # num_words: the payload's length (the mask's words per row, then its rows)
    DRAIN = 5  # rank 0 drains: a step still waiting for its mask samples unconstrained on every rank


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
        self.masks: list[tuple[dist.Work, torch.Tensor]] = []  # in flight, with their buffers

    def send(self, message: Message) -> None:
        k = self.sent % self.RING
        self.sent += 1
        if self.works[k] is not None:
            self.works[k].wait()
        self.headers[k].copy_(message.encode())
        self.works[k] = dist.broadcast(self.headers[k], src=0, group=self.group, async_op=True)

    def send_mask(self, step_id: int, mask: np.ndarray) -> None:
        """A step's mask [rows, words] int32: its header, then the words (kept until sent)."""
        payload = torch.from_numpy(np.concatenate([np.array([mask.shape[1]], np.int32), mask.ravel()]))
        self.send(Message(Kind.MASK, step_id, payload.numel()))
        self.masks = [(w, p) for w, p in self.masks if not w.is_completed()]
        self.masks.append((dist.broadcast(payload, src=0, group=self.group, async_op=True), payload))

    def flush(self) -> None:
        for work in self.works + [w for w, _ in self.masks]:
            if work is not None:
                work.wait()


class ControlReceiver:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.header = torch.zeros(HEADER_WORDS, dtype=torch.int64)

    def recv(self) -> Message:
        dist.broadcast(self.header, src=0, group=self.group)
        return Message.decode(self.header)

    def recv_mask(self, message: Message) -> np.ndarray:
        """The mask a MASK header announced, [rows, words] int32."""
        payload = torch.empty(message.num_words, dtype=torch.int32)
        dist.broadcast(payload, src=0, group=self.group)
        words = int(payload[0])
        return payload[1:].numpy().reshape(-1, words)
