"""Grammar mask work overlaps planning the next step (issue 23's idle figure; docs/pipeline.md hazard 10).

After processing step N the loop sends N's tokens and N+1's mask rows to the grammar workers and
returns; the next call plans and builds N+2 first, then waits for the rows, hands N+1's mask to the
worker and submits N+2. The same order in sync and async batching, with and without grammar
workers (the in-process path begins and concludes its fills at the same points), so the outputs
stay identical; an ending the fill finds after N+2 was planned is an abort of a request in flight."""
from __future__ import annotations

import pytest

from structured_cases import accepts
from tandem import LLM, SamplingParams, StructuredOutputsParams
from tandem.tokenizer import BYTE_EOS

MODEL = "random:tiny"
S = StructuredOutputsParams


def _llm(workers: int) -> LLM:
    llm = LLM(MODEL, dtype="float32", enforce_eager=True, max_num_seqs=16, max_model_len=256,
              structured_output_workers=workers)
    llm.engine.core.grammars.wait_for_workers(every=True)
    return llm


@pytest.fixture(scope="module")
def llms():
    """The in-process path and the grammar workers' path."""
    engines = {0: _llm(0), 2: _llm(2)}
    yield engines
    for llm in engines.values():
        llm.engine.shutdown()


def _compiled(llm: LLM, spec: StructuredOutputsParams) -> None:
    """Compile the spec first: requests waiting for it would add steps that plan nothing, as many as
    the compilation's time allows."""
    llm.engine.core.grammars.compiler.compile(spec).result()


def _record(llm: LLM, monkeypatch) -> list[str]:
    """Instrument the loop: what it asks of the scheduler, the grammar side and the device, in order."""
    core, events = llm.engine.core, []

    def spy(obj, name: str, label: str) -> None:
        real = getattr(obj, name)

        def call(*args, **kw):
            events.append(label)
            return real(*args, **kw)
        monkeypatch.setattr(obj, name, call)

    spy(core.scheduler, "schedule", "plan")
    spy(core.grammars, "begin_fill", "begin")
    spy(core.grammars, "mask_ready", "ready")
    spy(core.worker, "provide_mask", "provide")
    spy(core.worker, "submit", "submit")
    if core.grammars.pool is not None:
        spy(core.grammars.pool, "send", "send")
        spy(core.grammars.pool, "collect", "collect")
    return events


def _run(llm: LLM, async_batching: bool, monkeypatch) -> tuple[list[str], list]:
    llm.engine.core.set_async(async_batching)
    spec = S(regex="[a-z]{24}")
    _compiled(llm, spec)
    events = _record(llm, monkeypatch)
    outs = llm.generate(["a", "bb", "ccc", "dddd"], [SamplingParams(seed=i, temperature=1.0, max_tokens=40,
                                                                    structured_outputs=spec) for i in range(4)],
                        use_tqdm=False)
    monkeypatch.undo()
    assert all(accepts(spec, o.outputs[0].text) for o in outs)
    return events, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_next_step_is_planned_and_submitted_before_the_rows_are_waited_for(llms, workers, monkeypatch):
    llm = llms[workers]
    events, _ = _run(llm, True, monkeypatch)
    loop = [e for e in events if e not in ("send", "collect")]
    overlapped = 0
    for i, label in enumerate(loop):
        if label == "ready":  # the device gets the mask at once, and the next step right after it
            assert loop[i + 1] == "provide", loop[i - 3:i + 3]
        if label == "begin" and loop[i + 1:i + 5] == ["plan", "ready", "provide", "submit"]:
            overlapped += 1
    # 24 constrained tokens each: every decode step but the last ones overlaps its fill with planning
    assert overlapped >= 20, loop
    if llm.engine.core.grammars.pool is not None:  # the workers' answers are read only once the mask is due
        waited = [events[i - 1] for i, e in enumerate(events) if e == "collect"]
        assert set(waited) <= {"ready", "send"}  # (a send with no fill after it: nothing to overlap)
        assert waited.count("ready") >= 20
        sent_then_planned = sum(events[i + 1:i + 3] == ["plan", "ready"] for i, e in enumerate(events) if e == "send")
        assert sent_then_planned >= 20, events


def test_the_order_and_tokens_are_the_same_sync_and_async_with_and_without_workers(llms, monkeypatch):
    runs = {(workers, mode): _run(llm, mode, monkeypatch) for workers, llm in llms.items() for mode in (False, True)}
    strip = {key: ([e for e in events if e not in ("send", "collect")], tokens) for key, (events, tokens) in runs.items()}
    assert all(run == strip[0, False] for run in strip.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_an_abort_while_the_fill_is_pending_ends_the_request_once(llms, workers):
    engine = llms[workers].engine
    spec = S(regex="[a-z]{60}")
    for i in range(3):
        engine.add_request(f"p{i}", None, SamplingParams(seed=i, temperature=1.0, max_tokens=60,
                                                         structured_outputs=spec), prompt_token_ids=[1, 2, 3])
    finished = {}
    for _ in range(5):
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    newest = engine.core.in_flight[-1].masked
    assert newest is not None and newest.sent and not newest.provided  # its rows are on their way
    assert engine.abort_request("p1").outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id != "p1"
            if o.finished:
                finished[o.request_id] = o
    assert sorted(finished) == ["p0", "p2"]
    assert all(accepts(spec, o.outputs[0].text) for o in finished.values())


def test_a_grammar_stop_found_after_the_next_step_was_planned_gives_the_same_outputs(llms, monkeypatch):
    """With ignore_eos the scheduler keeps a request that took EOS; its grammar ends it once the fill
    concludes, after the next step was planned with it: the same loop and tokens in every mode and path."""
    spec = S(choice=["one", "three", "eleven"])
    params = [SamplingParams(seed=i, temperature=1.0, max_tokens=20, ignore_eos=True, structured_outputs=spec)
              for i in range(6)]
    got = {}
    for workers, llm in llms.items():
        for async_batching in (False, True):
            llm.engine.core.set_async(async_batching)
            _compiled(llm, spec)
            events = _record(llm, monkeypatch)
            outs = llm.generate([str(i) for i in range(6)], params, use_tqdm=False)
            monkeypatch.undo()
            loop = [e for e in events if e not in ("send", "collect")]
            got[workers, async_batching] = loop, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    want = got[0, False]
    assert all(v == want for v in got.values())
    assert all(reason == "stop" and ids[-1] == BYTE_EOS for ids, reason in want[1])


def test_host_only_figures_leave_the_fake_devices_mask_work_out_where_it_now_happens():
    """The fake device picks a masked step's tokens when it gets the mask, now inside the next step's
    submission: that is where ``host_only`` takes it out (no phase goes negative)."""
    from tandem.bench.host_only import measure

    f = measure(MODEL, 8, 8, 48, {"structured_output": "json"})
    assert f.steps > 0 and f.mask_ms > 0
    assert 0 <= f.submit_ms < f.process_ms  # (in this process the fill is in the processing: begin_fill)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_step_while_a_fill_is_pending_leaves_the_core_usable(llms, workers):
    """The loop raises with a fill begun (the workers' answers unread); the server's recovery drops
    the steps in flight and ends their requests: the next fill reads its own answers (not the dropped
    one's), and the core serves the next requests as before."""
    from tandem.engine.recovery import recover

    llm = llms[workers]
    engine, spec = llm.engine, S(regex="[a-z]{10,20}")
    params = [SamplingParams(seed=i, temperature=1.0, max_tokens=30, structured_outputs=spec) for i in range(3)]
    _compiled(llm, spec)
    want = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    for i, p in enumerate(params):
        engine.add_request(f"f{i}", None, p, prompt_token_ids=[1, 2, 3])
    for _ in range(4):
        engine.step()
    real = engine.core.scheduler.schedule
    engine.core.scheduler.schedule = lambda *a: (_ for _ in ()).throw(RuntimeError("injected"))
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()  # planning: the previous step's fill is on its way
    finally:
        engine.core.scheduler.schedule = real
    assert engine.core.grammars._pending is not None
    assert sorted(recover(engine.core, ["f0", "f1", "f2"])) == ["f0", "f1", "f2"]
    for i in range(3):
        engine.output_processor.abort(f"f{i}")
    got = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    pool = engine.core.grammars.pool
    if pool is not None:  # every answer was read by the fill it belongs to: none is left over
        assert not any(p.conn.poll(0.2) for p in pool.procs if p.conn is not None)
    assert engine.core.grammars._pending is None
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(accepts(spec, o.outputs[0].text) for o in got)
