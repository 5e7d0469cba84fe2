"""Server pieces without a server: n fan-out, the batch histogram, merging steps, the wire format."""
import msgspec
from prometheus_client import CollectorRegistry, Histogram

from tandem.engine.scheduler import StepDeltas
from tandem.engine.sequence import EngineRequest
from tandem.outputs import CompletionOutput, RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.engine.fanout import child_seed, fan_in, fan_out
from tandem.server.messages import (AddRequests, Stats, StepUpdate, input_decoder, input_encoder, output_decoder,
                                    output_encoder)
from tandem.server.metrics import BatchHistogram


def test_fan_out_gives_child_ids_and_consecutive_seeds():
    params = SamplingParams(temperature=0.7, seed=5, stop=["x"])
    assert fan_out("r", params, 1) == [("r", params)]
    children = fan_out("r", params, 3)
    assert [cid for cid, _ in children] == ["r-0", "r-1", "r-2"]
    assert [p.seed for _, p in children] == [5, 6, 7] and all(p.stop_strings == ["x"] for _, p in children)
    assert [p.seed for _, p in fan_out("r", SamplingParams(), 2)] == [None, None]
    assert child_seed(2**63 - 1, 1) == -(2**63)  # wraps within int64


def test_fan_in_indexes_the_choices():
    outs = [RequestOutput(f"r-{i}", "p", [1], [CompletionOutput(0, t, [i], "length")], True)
            for i, t in enumerate(["a", "b"])]
    merged = fan_in("r", outs)
    assert [(c.index, c.text) for c in merged.outputs] == [(0, "a"), (1, "b")] and merged.finished


def test_batch_histogram_matches_prometheus_histogram():
    buckets = (0.01, 0.1, 1.0)
    values = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0]
    mine = BatchHistogram(buckets)
    mine.observe_many(values[:3])
    mine.observe_many(values[3:])
    reference = CollectorRegistry()
    h = Histogram("t_seconds", "doc", buckets=buckets, registry=reference)
    for v in values:
        h.observe(v)
    samples = {(s.name, s.labels.get("le")): s.value for m in reference.collect() for s in m.samples}
    assert [(le, float(n)) for le, n in mine.buckets()] == [(le, samples["t_seconds_bucket", le])
                                                            for le in ("0.01", "0.1", "1.0", "+Inf")]
    assert mine.total == samples["t_seconds_sum", None]


def test_merged_steps_keep_each_requests_tokens_in_order():
    merged = StepDeltas.merge([StepDeltas(["a", "b"], [1, 2]), StepDeltas(["a"], [3], {"a": "length"}),
                     StepDeltas(["b"], [4], {"b": "stop"})])
    assert merged.token_request_ids == ["a", "b", "a", "b"] and merged.token_ids == [1, 2, 3, 4]
    assert merged.finished == {"a": "length", "b": "stop"}


def test_wire_messages_round_trip_and_validate_sampling_params():
    request = EngineRequest("r", [1, 2], SamplingParams(temperature=0.5, seed=3, stop="x"), 3, 10)
    decoded = input_decoder().decode(input_encoder().encode(AddRequests([request])))
    assert decoded == AddRequests([request]) and decoded.requests[0].params.stop_strings == ["x"]
    update = StepUpdate(StepDeltas(["r"], [7], {"r": "stop"}), Stats(1, 0, 0.25, 0, None), [0.1])
    assert output_decoder().decode(output_encoder().encode(update)) == update
    bad = msgspec.msgpack.encode({**msgspec.to_builtins(SamplingParams()), "temperature": -1.0})
    try:
        msgspec.msgpack.decode(bad, type=SamplingParams)
    except msgspec.ValidationError as exc:
        assert "temperature" in str(exc)
    else:
        raise AssertionError("an invalid SamplingParams decoded")
