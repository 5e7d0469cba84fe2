"""What crosses between the API process and the engine-core process (msgpack frames over ZeroMQ).

The payloads are the engine's own plain-data types: ``EngineRequest`` in, ``StepDeltas`` out, so the
core does no per-token work beyond what ``EngineCore.step`` already did. Structs are array-like
(positional, no field names on the wire) and tagged so one decoder reads every message kind."""
from __future__ import annotations

import msgspec

from tandem.engine.core import CoreStats
from tandem.engine.scheduler import StepDeltas
from tandem.engine.sequence import EngineRequest


# --- API process -> core ------------------------------------------------------------------------
class AddRequests(msgspec.Struct, tag="add", array_like=True):
    requests: list[EngineRequest]  # validated, tokenized, seeds resolved


class FinishRequests(msgspec.Struct, tag="finish", array_like=True):
    request_ids: list[str]
    reason: str  # "abort" (client gone, shutdown) or "stop" (a stop string ended it in the API)


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


InputMessage = AddRequests | FinishRequests | Shutdown


# --- core -> API process ------------------------------------------------------------------------
class Ready(msgspec.Struct, tag="ready", array_like=True):
    """Sent once the worker is built: what the API needs to validate requests."""

    max_model_len: int
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    device: str
    device_name: str
    dtype: str


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """The core could not start, or its loop raised: it exits after sending this."""

    message: str
    during_startup: bool


#: ``EngineCore.stats()``, sent as it is: at most every STATS_INTERVAL_S and when the core idles
Stats = CoreStats


class StepUpdate(msgspec.Struct, tag="step", array_like=True):
    deltas: StepDeltas  # new token ids per request, finished requests
    stats: Stats | None = None
    queue_times: list[float] = []  # seconds from arrival in the core to first scheduled, per newly run request
    rejected: dict[str, str] = {}  # request id -> why the core refused it (never expected: the API validates)
    errors: dict[str, str] = {}  # request id -> why a failed step ended it (the core recovered and serves on)


OutputMessage = Ready | Failed | StepUpdate


def input_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def input_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(InputMessage)


def output_encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def output_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(OutputMessage)
