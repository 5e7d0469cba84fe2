"""Recovery from an exception inside a step (``tandem.engine.recovery``), on the real engine: faults
injected in planning, on the device (between a step's submission and its collection, with the next
step already launched in async mode) and in applying a step's output. The requests the failed step
touched end; every other request finishes with exactly the tokens of a fault-free run; afterwards
every KV block and row is free and the engine serves on. When the state cannot be trusted (the
device cannot be drained, the books do not balance) recovery refuses: ``CoreStateError``."""
from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from reliability_utils import record
from tandem.config import EngineConfig
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.recovery import CoreStateError, check_accounting, recover
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence
from tandem.llm import create_engine
from tandem.sampling_params import SamplingParams
from tandem.server.fault_injection import InjectedFault, install_core_faults, parse

NUM_REQUESTS = 10
FAULT_SPECS = ["schedule@4", "device@6", "update@9", "device@2,schedule@30,update@60"]
_figures = {"runs": 0, "faults": 0, "ended": 0, "finished": 0}


def _workload() -> list[tuple[list[int], SamplingParams]]:
    """Mixed lengths (chunked prefill at 16 tokens a step), greedy and seeded sampling; the longer
    prompts share a two-block prefix, which the prefix-caching engine finds in its cache."""
    shared = [(11 * j) % 500 + 3 for j in range(16)]
    return [((shared if i > 2 else []) + [(7 * i + j) % 500 + 3 for j in range(5 + 7 * i)],
             SamplingParams(max_tokens=12 + 2 * i, ignore_eos=True, temperature=0.0 if i % 2 else 0.9, seed=40 + i))
            for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module", params=[(True, False), (False, False), (True, True)],
                ids=["async", "sync", "async-prefix-caching"])
def engine(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a loaded 2-core machine: OpenMP's 2 threads only contend
    async_batching, prefix_caching = request.param
    config = EngineConfig(model="random:tiny", device="cpu", async_batching=async_batching, max_num_seqs=3,
                          max_num_batched_tokens=16, kv_cache_tokens=256, block_size=8, seed=3,
                          enable_prefix_caching=prefix_caching)
    eng = create_engine(config)
    eng.reference = _run(eng, "ref", [])[0]  # a fault-free run on the same engine
    yield eng
    eng.shutdown()
    torch.set_num_threads(threads)


def _run(engine, tag: str, faults: list) -> tuple[dict[int, list[int]], set[int], int]:
    """The workload to the end, recovering like the core process does; (finished tokens by index,
    indices that ended by the fault, faults hit)."""
    remove = install_core_faults(engine.core, faults)
    ids = [f"{tag}-{i}" for i in range(NUM_REQUESTS)]
    try:
        for rid, (prompt, params) in zip(ids, _workload()):
            engine.add_request(rid, None, params, prompt_token_ids=prompt)
        finished, ended, hits = {}, set(), 0
        for _ in range(10_000):
            if not engine.has_unfinished_requests():
                break
            try:
                outputs = engine.step()
            except InjectedFault:
                hits += 1
                for rid in recover(engine.core, list(engine.output_processor.requests)):
                    engine.output_processor.abort(rid)
                    ended.add(ids.index(rid))
                continue
            finished.update({ids.index(o.request_id): o.outputs[0].token_ids for o in outputs if o.finished})
        else:
            raise AssertionError("the engine made no progress")
        return finished, ended, hits
    finally:
        remove()


def _assert_idle(engine) -> None:
    scheduler = engine.core.scheduler
    assert not engine.has_unfinished_requests() and not engine.output_processor.requests
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks - 1
    assert scheduler.rows.num_free == scheduler.rows.num_rows and scheduler.kv_usage() == 0


@pytest.mark.parametrize("spec", FAULT_SPECS)
def test_a_failed_step_ends_what_it_touched_and_the_rest_finish_identically(engine, spec):
    faults = parse(spec)
    finished, ended, hits = _run(engine, spec, faults)
    assert hits == len(faults)
    assert ended and not ended & finished.keys() and ended | finished.keys() == set(range(NUM_REQUESTS))
    assert finished == {i: engine.reference[i] for i in finished}
    _assert_idle(engine)
    cache = engine.core.scheduler.cache
    assert cache is None or cache.stats.hits > 0  # recovery forgets the cache; later requests refill it
    _figures["runs"] += 1
    _figures["faults"] += hits
    _figures["ended"] += len(ended)
    _figures["finished"] += len(finished)


def test_after_the_faults_a_clean_run_matches_the_reference(engine):
    finished, ended, _ = _run(engine, "clean", [])
    assert finished == engine.reference and not ended
    _assert_idle(engine)
    record("engine_fault_recovery", **_figures)


# --- when recovery must refuse -----------------------------------------------------------------------
class _Worker:
    def __init__(self, drain_error: Exception | None = None) -> None:
        self.drain_error = drain_error

    def drain(self) -> None:
        if self.drain_error is not None:
            raise self.drain_error


def _core(worker: _Worker) -> SimpleNamespace:
    """What recovery reads of an EngineCore: the worker, the steps in flight, the scheduler."""
    scheduler = Scheduler(4, 64, BlockManager(9, 4), RowPool(4))
    for i in range(3):
        scheduler.add(Sequence(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), i, 4))
    scheduler.schedule()  # r0..r2 run, holding blocks and rows, their tokens pending
    return SimpleNamespace(worker=worker, in_flight=deque(["a step"]), scheduler=scheduler)


def test_recovery_ends_running_requests_and_frees_everything():
    core = _core(_Worker())
    core.scheduler.add(Sequence("never-ran", [1], SamplingParams(max_tokens=2), 9, 2))
    assert sorted(recover(core, ["r0", "r1", "r2", "never-ran"])) == ["r0", "r1", "r2"]
    assert not core.in_flight and list(core.scheduler.requests) == ["never-ran"]
    check_accounting(core.scheduler)


def test_a_preempted_request_whose_token_is_in_flight_is_ended_too():
    """Left waiting, its pending token would never come back and it would block the queue for good."""
    core = _core(_Worker())
    victim = core.scheduler.running[-1]
    core.scheduler.preempt(victim)
    assert victim.num_pending == 1
    assert sorted(recover(core, ["r0", "r1", "r2"])) == ["r0", "r1", "r2"]
    check_accounting(core.scheduler)


def test_a_device_that_cannot_be_drained_is_fatal():
    with pytest.raises(CoreStateError, match="could not be drained"):
        recover(_core(_Worker(RuntimeError("device lost"))), [])


def test_a_half_admitted_sequence_is_fatal():
    core = _core(_Worker())
    core.scheduler.running.pop()  # as if planning raised between two of its updates
    with pytest.raises(CoreStateError, match="inconsistent"):
        recover(core, [])


def test_a_leaked_block_is_fatal():
    core = _core(_Worker())
    core.scheduler.blocks.grow([], 4)  # a block that nobody holds and nobody will free
    with pytest.raises(CoreStateError, match="does not balance"):
        recover(core, [])
