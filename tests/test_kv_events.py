"""KV-cache events (--kv-events-config): a ZeroMQ subscriber decodes, with the schema routers use
(vLLM's, written out here independently of tandem's structs), BlockStored for a prompt's full
blocks, BlockRemoved when those blocks are reused, AllBlocksCleared on a cache reset; the replay
socket resends the same batches; bad configs are refused before anything loads."""
import json
import random
import time

import msgspec
import pytest
import zmq

from tandem import LLM, SamplingParams
from tandem.config import EngineConfig
from tandem.engine.prefix_cache import block_hash


# --- the documented wire schema ----------------------------------------------------------------
class Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class Event(msgspec.Struct, array_like=True, tag=True):
    pass


class BlockStored(Event):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(Event):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(Event):
    pass


EVENT = msgspec.msgpack.Decoder(BlockStored | BlockRemoved | AllBlocksCleared)
BATCH = msgspec.msgpack.Decoder(Batch)


def _ext(h: bytes) -> int:
    return int.from_bytes(h[-8:], "big")  # the low 64 bits of the chain hash, unsigned


def _chain(tokens: list[int], block_size: int = 16) -> list[int]:
    hashes, parent = [], None
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
        hashes.append(_ext(parent))
    return hashes


def _config(tmp_path, **extra) -> str:
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{tmp_path}/pub",
                       "replay_endpoint": f"ipc://{tmp_path}/replay", "topic": "kv-events", **extra})


class Subscriber:
    def __init__(self, ctx: zmq.Context, endpoint: str, topic: bytes) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.seqs: list[int] = []
        self.payloads: list[bytes] = []
        self.events: list[Event] = []

    def wait_for(self, done, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.events):
            assert time.monotonic() < deadline, f"no such event in time; got {self.events}"
            if self.sock.poll(100):
                topic, seq, payload = self.sock.recv_multipart()
                assert topic == b"kv-events"
                self.seqs.append(int.from_bytes(seq, "big"))
                self.payloads.append(payload)
                self.events += [EVENT.decode(e) for e in BATCH.decode(payload).events]


def test_stored_removed_and_cleared_events_reach_a_subscriber(tmp_path):
    llm = LLM("random:tiny", dtype="float32", kv_cache_tokens=128, kv_events_config=_config(tmp_path))
    usable = llm.engine.core.scheduler.blocks.num_blocks - 1  # block 0 is reserved
    rng = random.Random(0)
    # the second prompt (+ 1 token) needs every block: it must reuse both of the first prompt's full blocks
    first, second = [rng.randrange(1, 500) for _ in range(40)], [rng.randrange(1, 500) for _ in range(16 * usable - 8)]
    ctx = zmq.Context()
    try:
        sub = Subscriber(ctx, f"ipc://{tmp_path}/pub", b"kv-events")
        time.sleep(0.3)  # the subscription reaches the publisher (ZeroMQ's slow joiner)
        params = SamplingParams(max_tokens=1, temperature=0)
        llm.generate([first], params, use_tqdm=False)
        sub.wait_for(lambda ev: any(isinstance(e, BlockStored) for e in ev))
        stored = [e for e in sub.events if isinstance(e, BlockStored)]
        assert [(e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size, e.lora_id, e.medium)
                for e in stored] == [(_chain(first), None, first[:32], 16, None, "GPU")]

        llm.generate([second], params, use_tqdm=False)
        removed = lambda ev: {h for e in ev if isinstance(e, BlockRemoved) for h in e.block_hashes}  # noqa: E731
        sub.wait_for(lambda ev: set(_chain(first)) <= removed(ev))
        sub.wait_for(lambda ev: any(isinstance(e, BlockStored) and e.block_hashes[0] == _chain(second)[0]
                                    for e in ev))
        later = [e for e in sub.events if isinstance(e, BlockStored)][1:]
        assert [h for e in later for h in e.block_hashes] == _chain(second)
        assert [t for e in later for t in e.token_ids] == second[:16 * (usable - 1)]

        llm.engine.core.reset_prefix_cache()
        llm.generate([first[:8]], params, use_tqdm=False)  # any step: events go out as they are queued
        sub.wait_for(lambda ev: isinstance(ev[-1], AllBlocksCleared))
        assert sub.seqs == list(range(len(sub.seqs)))  # one sequence number per batch, no gaps

        # the replay socket resends every buffered batch from a sequence number on, then -1
        replay = ctx.socket(zmq.DEALER)
        replay.connect(f"ipc://{tmp_path}/replay")
        replay.send_multipart([b"", (1).to_bytes(8, "big")])
        resent = []
        while True:
            assert replay.poll(5000), "no replay answer"
            _, seq, payload = replay.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                break
            resent.append((int.from_bytes(seq, "big"), payload))
        assert resent == list(zip(sub.seqs, sub.payloads))[1:]
    finally:
        ctx.destroy(linger=0)
        llm.engine.shutdown()


def test_events_off_costs_no_recorder():
    llm = LLM("random:tiny", dtype="float32", kv_cache_tokens=256)
    assert llm.engine.core.scheduler.cache.events is None
    off = json.dumps({"enable_kv_cache_events": True, "publisher": "null"})
    assert LLM("random:tiny", dtype="float32", kv_cache_tokens=256,
               kv_events_config=off).engine.core.scheduler.cache.events is None


@pytest.mark.parametrize("text, message", [
    ('{"enable_kv_cache_events": true, "endpont": "tcp://*:5557"}', "unknown key(s) ['endpont']"),
    ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events must be bool"),
    ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher must be one of"),
    ('{"enable_kv_cache_events": true, "endpoint": "5557"}', "endpoint must be a ZeroMQ address"),
    ('[1, 2]', "must be a JSON object"),
    ('{"enable_kv_cache_events": true', "must be a JSON object"),
])
def test_a_bad_config_is_refused_naming_what_is_wrong(text, message):
    with pytest.raises(ValueError, match="kv_events_config") as err:
        EngineConfig("random:tiny", kv_events_config=text)
    assert message in str(err.value)


def test_events_need_prefix_caching():
    with pytest.raises(ValueError, match="enable_prefix_caching is off"):
        EngineConfig("random:tiny", enable_prefix_caching=False,
                     kv_events_config='{"enable_kv_cache_events": true}')


def test_a_taken_endpoint_fails_at_start(tmp_path):
    ctx = zmq.Context()
    try:
        taken = ctx.socket(zmq.PUB)
        port = taken.bind_to_random_port("tcp://*")
        with pytest.raises(ValueError, match="cannot open"):
            LLM("random:tiny", dtype="float32", kv_cache_tokens=256,
                kv_events_config=json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port}"}))
    finally:
        ctx.destroy(linger=0)


def test_data_parallel_ranks_publish_on_their_own_port():
    from tandem.engine.kv_events import offset_endpoint

    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559"
    assert offset_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"


def test_a_full_queue_drops_and_counts_and_batches_stay_bounded(tmp_path):
    from tandem.engine.kv_events import MAX_BATCH_EVENTS, BlockRemoved as Removed, KVEventRecorder, KVEventsConfig

    recorder = KVEventRecorder(KVEventsConfig(True, endpoint=f"ipc://{tmp_path}/q", max_queue_size=3), 16)
    recorder.close()  # the thread is gone: what is queued now stays queued
    for i in range(5):
        recorder.removed(bytes([i]) * 16)
    assert (len(recorder._pending), recorder.dropped) == (3, 2)
    assert [e.block_hashes for e in recorder._drain()] == [[int.from_bytes(bytes([i]) * 8, "big") for i in range(3)]]
    for i in range(MAX_BATCH_EVENTS + 5):
        recorder._pending.append(("c",) if i % 2 else ("r", bytes(16)))
    first = recorder._drain()
    assert len(first) == MAX_BATCH_EVENTS and not any(isinstance(e, Removed) and len(e.block_hashes) > 1 for e in first)
    assert len(recorder._drain()) == 5


def test_a_data_parallel_core_publishes_on_its_own_endpoint_with_its_rank(tmp_path, monkeypatch):
    from tandem.engine.kv_events import DP_RANK_ENV, open_kv_events
    from tandem.server.dp_client import core_devices

    assert [env[DP_RANK_ENV] for env in core_devices(EngineConfig("random:tiny", device="cpu"), 2)] == ["0", "1"]
    monkeypatch.setenv(DP_RANK_ENV, "1")  # what the API process gives engine core 1 under --data-parallel-size
    recorder = open_kv_events(json.dumps({"enable_kv_cache_events": True, "endpoint": f"ipc://{tmp_path}/pub"}), 16)
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{tmp_path}/pub_dp1")
        time.sleep(0.3)
        recorder.cleared()
        assert sub.poll(5000)
        _, seq, payload = sub.recv_multipart()
        batch = BATCH.decode(payload)
        assert (int.from_bytes(seq, "big"), batch.data_parallel_rank) == (0, 1)
        assert isinstance(EVENT.decode(batch.events[0]), AllBlocksCleared)
    finally:
        recorder.close()
        ctx.destroy(linger=0)


def test_the_event_stream_rebuilds_exactly_the_cached_blocks(tmp_path):
    """A router's index, built from the events alone, ends equal to the cache's own set of blocks:
    shared prefixes, evictions under a small cache, and preemption included."""
    rng = random.Random(1)
    llm = LLM("random:tiny", dtype="float32", kv_cache_tokens=320, max_num_seqs=6,
              kv_events_config=_config(tmp_path))
    cache = llm.engine.core.scheduler.cache
    ctx = zmq.Context()
    try:
        sub = Subscriber(ctx, f"ipc://{tmp_path}/pub", b"kv-events")
        time.sleep(0.3)
        systems = [[rng.randrange(1, 500) for _ in range(40)] for _ in range(3)]
        prompts = [rng.choice(systems)[:rng.randrange(8, 41)]
                   + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 60))] for _ in range(24)]
        llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
        expected = {_ext(h) for h in cache._block_of}
        stats = llm.engine.core.stats()
        assert expected and stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
        index: set[int] = set()

        def replay(events):
            index.clear()
            for e in events:
                if isinstance(e, AllBlocksCleared):
                    index.clear()
                elif isinstance(e, BlockStored):
                    assert not set(e.block_hashes) & index, "a block stored twice"
                    index.update(e.block_hashes)
                else:
                    assert set(e.block_hashes) <= index, "a block removed that was never stored"
                    index.difference_update(e.block_hashes)
            return index == expected

        sub.wait_for(replay)
        assert any(isinstance(e, BlockRemoved) for e in sub.events)  # the small cache did evict
    finally:
        ctx.destroy(linger=0)
        llm.engine.shutdown()
