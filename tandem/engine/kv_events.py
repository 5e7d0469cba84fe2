"""KV-cache events: which prefix blocks the engine holds, published over ZeroMQ for routers.

A prefix-aware router (llm-d's KV-cache manager, NVIDIA Dynamo's KV router, the Gateway API
Inference Extension's prefix scorer fed by them) keeps an index block hash -> replicas and sends a
request where most of its prefix is cached. They read vLLM's event stream, so this is that stream:

- a PUB socket sends one multipart message per batch: ``[topic, seq, payload]``, ``seq`` an 8-byte
  big-endian counter of batches (from 0, so a subscriber sees a gap), ``payload`` a msgpack-encoded
  ``KVEventBatch`` (msgspec, array-like): ``[ts, [event, ...], data_parallel_rank]``;
- an event is an array whose first element names it: ``["BlockStored", block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes,
  medium]``, ``["AllBlocksCleared"]``;
- a block hash is the low 64 bits of tandem's BLAKE2b chain hash (``prefix_cache.block_hash``) as an
  unsigned integer (vLLM's default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); ``token_ids`` are the
  stored blocks' tokens, ``block_size`` per block, so a router may hash them its own way;
- an optional ROUTER socket (``replay_endpoint``) answers a request ``[b"", start_seq]`` with every
  buffered batch from ``start_seq`` on, ``[b"", seq, payload]`` each, then ``[b"", -1, b""]``.

BlockStored is published when a full block enters the prefix cache (when the step that computes it
is scheduled: any later request may share it from then on), BlockRemoved when a cached block is
reused for other tokens, AllBlocksCleared when the cache is reset.

The engine loop never waits on any of this: it appends plain tuples to a deque (about a
microsecond per event on a busy 2-core CPU) and a background thread builds, encodes and sends the
batches (at most ``MAX_BATCH_EVENTS`` events each). While more
than ``max_queue_size`` events wait, new ones are dropped and counted (``dropped``; logged once),
which leaves a router's index stale, never the engine slow. Off (the default), there is no
recorder and the prefix cache pays one ``is None`` test per registration and eviction."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

import msgspec

log = logging.getLogger(__name__)

MEDIUM = "GPU"  # vLLM's name for the engine's own KV cache (device memory): the only tier tandem has
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ends a replay
MAX_BATCH_EVENTS = 1024  # events per published batch
DP_RANK_ENV = "TANDEM_DATA_PARALLEL_RANK"  # an engine core's rank under data parallelism (its port offset)


@dataclass(frozen=True)
class KVEventsConfig:
    """``--kv-events-config``'s JSON object (vLLM's keys and defaults)."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"  # zmq, or null: nothing is recorded
    endpoint: str = "tcp://*:5557"  # bound when it has a wildcard (*, ::) or is ipc:// / inproc://, else connected
    replay_endpoint: str | None = None  # a ROUTER socket that resends buffered batches on request
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's send high-water mark (ZeroMQ drops beyond it per subscriber)
    max_queue_size: int = 100_000  # events waiting for the publisher thread; more are dropped
    topic: str = ""  # the first frame of every message (subscribers filter on it)

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


_PUBLISHERS = ("zmq", "null")
_KINDS = {"bool": bool, "str": str, "int": int, "str | None": (str, type(None))}


def parse_kv_events_config(text: str | None) -> KVEventsConfig | None:
    """The config in ``text`` (JSON), or None for None; a ValueError names what is wrong."""
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"kv_events_config must be a JSON object: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"kv_events_config must be a JSON object, got {text!r}")
    known = {f.name: f for f in fields(KVEventsConfig)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"kv_events_config: unknown key(s) {unknown}; known: {sorted(known)}")
    for name, value in raw.items():
        kind = _KINDS[known[name].type]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"kv_events_config: {name} must be {known[name].type}, got {value!r}")
    config = KVEventsConfig(**raw)
    if config.publisher not in _PUBLISHERS:
        raise ValueError(f"kv_events_config: publisher must be one of {_PUBLISHERS}, got {config.publisher!r}")
    for name in ("buffer_steps", "hwm", "max_queue_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"kv_events_config: {name} must be >= 1, got {getattr(config, name)}")
    if config.active and "://" not in config.endpoint:
        raise ValueError(f"kv_events_config: endpoint must be a ZeroMQ address (tcp://*:5557), "
                         f"got {config.endpoint!r}")
    return config


# The wire schema (vLLM's msgspec structs, array-like: field order is the format)
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """One change to the set of cached blocks; encoded as ``[name, fields...]``."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def external_hash(block_hash: bytes) -> int:
    """The hash routers see: the low 64 bits of the chain hash, unsigned."""
    return int.from_bytes(block_hash[-8:], "big")


def offset_endpoint(endpoint: str, data_parallel_rank: int) -> str:
    """Engine core ``rank`` of a data-parallel server publishes on the endpoint's port + rank."""
    if data_parallel_rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + data_parallel_rank}"
    return f"{endpoint}_dp{data_parallel_rank}"


def open_kv_events(text: str | None, block_size: int, data_parallel_rank: int | None = None) -> KVEventRecorder | None:
    """The recorder ``--kv-events-config`` asks for (sockets bound now: a taken port fails at start), or
    None when events are off. The rank defaults to ``$TANDEM_DATA_PARALLEL_RANK`` (0 without it)."""
    config = parse_kv_events_config(text)
    if config is None or not config.active:
        return None
    if data_parallel_rank is None:
        data_parallel_rank = int(os.environ.get(DP_RANK_ENV, "0"))
    return KVEventRecorder(config, block_size, data_parallel_rank)


class KVEventRecorder:
    """The engine's side: ``stored`` / ``removed`` / ``cleared`` append to a queue a thread publishes."""

    def __init__(self, config: KVEventsConfig, block_size: int, data_parallel_rank: int = 0) -> None:
        import zmq  # only where events are on

        self.config = config
        self.block_size = block_size
        self.data_parallel_rank = data_parallel_rank
        self.dropped = 0  # events not published because the queue was full
        self.published = 0  # batches sent
        self._pending: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._replay = None
        try:
            endpoint = offset_endpoint(config.endpoint, data_parallel_rank)
            if any(w in endpoint for w in ("*", "::")) or endpoint.startswith(("ipc://", "inproc://")):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if config.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(offset_endpoint(config.replay_endpoint, data_parallel_rank))
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise ValueError(f"kv_events_config: cannot open {config.endpoint!r} / "
                             f"{config.replay_endpoint!r}: {exc}") from exc
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="tandem-kv-events", daemon=True)
        self._thread.start()

    # --- the engine's side: append only ---------------------------------------------------------
    def stored(self, parent: bytes | None, hashes: list[bytes], token_ids: list[int]) -> None:
        """Blocks ``hashes`` (a chain following ``parent``) now cached, holding ``token_ids``."""
        self._put(("s", parent, hashes, token_ids))

    def removed(self, block_hash: bytes) -> None:
        self._put(("r", block_hash))

    def cleared(self) -> None:
        self._put(("c",))

    def _put(self, item: tuple) -> None:
        if len(self._pending) >= self.config.max_queue_size:
            self.dropped += 1
            return
        self._pending.append(item)
        if len(self._pending) == 1:
            self._wake.set()

    def close(self, timeout_s: float = 2.0) -> None:
        """Publish what is queued, then stop the thread and close the sockets."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)

    # --- the publisher thread -------------------------------------------------------------------
    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        topic = self.config.topic.encode()
        warned = False
        while True:
            self._wake.wait(0.05 if self._replay is not None else 1.0)
            self._wake.clear()
            if self._replay is not None:
                self._serve_replays()
            while self._pending:  # batches of at most MAX_BATCH_EVENTS: a message stays small
                payload = encoder.encode(KVEventBatch(time.time(), self._drain(), self.data_parallel_rank))
                self._pub.send_multipart((topic, self._seq.to_bytes(8, "big"), payload))
                self._buffer.append((self._seq, payload))
                self._seq += 1
                self.published += 1
            if self.dropped and not warned:
                warned = True
                log.warning("KV-cache events: the publisher fell behind; %d event(s) dropped (routers' view of "
                            "this engine's cache is stale until its blocks change again)", self.dropped)
            if self._stop and not self._pending:
                break
        self._pub.close(linger=1000)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()

    def _drain(self) -> list[KVCacheEvent]:
        """What is queued (up to a batch) as events; consecutive removals become one BlockRemoved."""
        events: list[KVCacheEvent] = []
        while self._pending and len(events) < MAX_BATCH_EVENTS:
            item = self._pending.popleft()
            if item[0] == "s":
                _, parent, hashes, tokens = item
                events.append(BlockStored([external_hash(h) for h in hashes],
                                          None if parent is None else external_hash(parent),
                                          tokens, self.block_size, None, MEDIUM))
            elif item[0] == "r":
                if events and isinstance(events[-1], BlockRemoved):
                    events[-1].block_hashes.append(external_hash(item[1]))
                else:
                    events.append(BlockRemoved([external_hash(item[1])], MEDIUM))
            else:
                events.append(AllBlocksCleared())
        return events

    def _serve_replays(self) -> None:
        import zmq

        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("KV-cache events: a malformed replay request (%d frames) was ignored", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
            self._replay.send_multipart((client, b"", END_SEQ, b""))
