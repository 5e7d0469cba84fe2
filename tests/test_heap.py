"""The step loop keeps the garbage collector's scans short: admitted requests are frozen, which is
safe only because the loop makes no reference cycles; an idle engine collects what was frozen."""
import gc
import subprocess
import sys
import weakref

import pytest

from tandem import LLM, SamplingParams
from tandem.bench.fake_worker import FakeWorker
from tandem.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine


@pytest.fixture
def collector_off():
    """Cyclic garbage stays where it is while the test runs, to be found with DEBUG_SAVEALL (what
    earlier tests left, frozen or not, is collected first)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _cyclic_garbage() -> list[str]:
    gc.unfreeze()  # frozen objects are skipped by collections: look at everything
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    names = sorted({type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage})
    gc.set_debug(0)
    gc.garbage.clear()
    gc.collect()  # saved, they were not freed: free them now
    gc.freeze()
    return names


def _mixed_params(i: int) -> SamplingParams:
    """Features the loop handles per request: penalties, logprobs, stops, bias, min_tokens."""
    return [SamplingParams(temperature=0.8, seed=i, max_tokens=12, logprobs=3, presence_penalty=0.4),
            SamplingParams(temperature=0, max_tokens=9, stop=["a"], logit_bias={5: 2.0}, min_tokens=2),
            SamplingParams(temperature=1.0, max_tokens=7, repetition_penalty=1.2, prompt_logprobs=2),
            SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[7], frequency_penalty=0.3)][i % 4]


def test_the_step_loop_makes_no_cyclic_garbage(collector_off):
    """Host loop alone (scheduler, batch builder, outputs, prefix cache, preemption) over many
    requests, sync and async; then the whole engine on a CPU model with a stream and an abort."""
    config = EngineConfig.from_options("random:tiny", max_num_seqs=8, max_model_len=96)
    engine = LLMEngine(config, FakeWorker(config, kv_tokens=16 * 12))  # few blocks: preemption happens
    _cyclic_garbage()  # start-up's, not the loop's
    for i in range(40):
        engine.add_request(str(i), f"prompt {i} " * (i % 7 + 1), _mixed_params(i), stream=i % 3 == 0)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == 5:
            engine.abort_request("4")
    assert engine.core.scheduler.num_preemptions > 0
    assert _cyclic_garbage() == []

    llm = LLM("random:tiny", device="cpu", kv_cache_tokens=512, max_num_seqs=4)
    prompts = [f"hello {i}" for i in range(10)]
    params = [_mixed_params(i) for i in range(9)] + [SamplingParams(n=2, temperature=1.0, max_tokens=5)]
    for async_batching in (False, True):
        llm.engine.core.set_async(async_batching)  # a new executor (threads): not the loop's
        llm.generate(prompts, params, use_tqdm=False)  # first use: lazy imports leave garbage once
        _cyclic_garbage()
        llm.generate(prompts, params, use_tqdm=False)
        stream = llm.engine.add_request("s", "to abort", SamplingParams(max_tokens=50), stream=True)
        llm.engine.step()
        llm.engine.abort_request("s")
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        del stream
        assert _cyclic_garbage() == []


def test_admitted_requests_leave_the_collectors_view():
    config = EngineConfig.from_options("random:tiny", max_num_seqs=4, max_model_len=64)
    engine = LLMEngine(config, FakeWorker(config))
    engine.add_request("r", "a prompt", SamplingParams(max_tokens=5))
    seq = engine.core.scheduler.requests["r"]
    tracked = {id(o) for o in gc.get_objects()}  # the young and old generations, not the frozen one
    assert gc.is_tracked(seq.prompt_token_ids) and id(seq.prompt_token_ids) not in tracked and id(seq) not in tracked
    seq.block_ids = []  # as a preemption leaves it: a new list, filled when the sequence joins the batch again
    engine.step()
    tracked = {id(o) for o in gc.get_objects()}
    assert seq.block_ids and id(seq.block_ids) not in tracked
    while engine.has_unfinished_requests():
        engine.step()


def test_an_idle_engine_collects_cycles_that_were_frozen():
    class Node:
        pass

    config = EngineConfig.from_options("random:tiny", max_num_seqs=4, max_model_len=64)
    engine = LLMEngine(config, FakeWorker(config))
    heap = engine.core.heap
    heap.cleanup_after_blocks = 10**9  # far more than this test grows the heap: idle, the engine leaves it frozen
    engine.add_request("r", "a prompt", SamplingParams(max_tokens=3))
    node = Node()
    node.self = node  # a cycle, frozen with the admission below
    gone = weakref.ref(node)
    engine.add_request("q", "another", SamplingParams(max_tokens=4))
    del node
    gc.collect()
    assert gone() is not None  # frozen: collections do not see it
    cleanups = heap.cleanups
    while engine.has_unfinished_requests():
        engine.step()
    assert heap.cleanups == cleanups and gone() is not None
    heap.cleanup_after_blocks = -(10**9)  # whatever the growth: clean up
    heap.idle()
    assert heap.cleanups == cleanups + 1 and gone() is None


def test_an_idle_engine_cleans_up_once_the_heap_has_grown_by_its_threshold():
    config = EngineConfig.from_options("random:tiny", max_num_seqs=4, max_model_len=64)
    engine = LLMEngine(config, FakeWorker(config))
    heap = engine.core.heap
    heap.cleanup_after_blocks = 50_000
    engine.add_request("r", "a prompt", SamplingParams(max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()
    cleanups = heap.cleanups
    heap.idle()
    assert heap.cleanups == cleanups  # a few requests grow the heap by far less
    kept = [[i] for i in range(40_000)]  # two blocks each (the list and its item array)
    heap.idle()
    assert heap.cleanups == cleanups + 1
    heap.idle()
    assert heap.cleanups == cleanups + 1  # measured from the clean-up on
    more = [[i] for i in range(40_000)]
    with heap.held():  # a benchmark's clock runs: the clean-up waits
        heap.idle()
        assert heap.cleanups == cleanups + 1
    heap.idle()
    assert heap.cleanups == cleanups + 2
    del kept, more


def test_a_benchmark_run_holds_the_clean_up_until_its_clock_stops(monkeypatch):
    from tandem.bench.measure import measure_mode
    from tandem.bench.workload import LengthRange, Workload, make_requests

    config = EngineConfig.from_options("random:tiny", max_num_seqs=4, max_model_len=64)
    engine = LLMEngine(config, FakeWorker(config))
    heap = engine.core.heap
    heap.cleanup_after_blocks = -(10**9)  # due at every idle moment
    held_at_idle = []
    idle = heap.idle
    monkeypatch.setattr(heap, "idle", lambda: (held_at_idle.append(heap._held), idle()))
    w = Workload(4, LengthRange(8, 8), LengthRange(4, 4))
    cleanups = heap.cleanups
    measure_mode(engine, "async", make_requests(w, engine.model_config.vocab_size), w, None, None, False)
    assert held_at_idle[:-1] and all(held_at_idle[:-1]) and held_at_idle[-1] is False
    assert heap.cleanups == cleanups + 1  # once, after the run


_FROZEN_CYCLE_AT_EXIT = """
import sys
from tandem.engine.heap import freeze

class Node:
    def __del__(self):
        sys.stdout.write("collected")
        sys.stdout.flush()

node = Node()
node.me = node  # a cycle only the interpreter's last collection frees
freeze()
"""


def test_what_was_frozen_is_still_freed_at_exit():
    """Frozen objects are skipped by every collection, the interpreter's last one too, unless they
    are unfrozen first (Triton's extension types otherwise print leak reports at exit)."""
    done = subprocess.run([sys.executable, "-c", _FROZEN_CYCLE_AT_EXIT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "collected"
