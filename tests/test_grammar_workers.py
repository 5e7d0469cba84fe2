"""Grammar worker processes (``structured_output_workers``, issue 23 point 4): the grammar work of
constrained requests in other processes, off the step loop's thread.

- the masks the workers write into shared memory equal the engine process's, bit for bit, for random
  specs and every host rule (bad words, allowed ids, min_tokens, reasoning), as do the endings they
  report (a grammar that stops, a rejected token, a row with no token left);
- the engine with workers gives the outputs of the engine without, sync and async, with preemption,
  aborts, n > 1 samples and bad words;
- a killed worker fails exactly its requests, the engine serves on (the worker is started again),
  and shutdown leaves no process behind."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest

from differential import VOCAB, Case, compare, drive_case, make_case, with_constraints
from structured_cases import random_spec
from tandem import LLM, SamplingParams, StructuredOutputsParams
from tandem.tokenizer import BYTE_EOS

MODEL = "random:tiny"
WORDS = VOCAB // 32
WORKERS = 2


def _rules_spec(rng: random.Random, i: int):
    from tandem.engine.structured.rules import RulesSpec, token_words

    kind = i % 5
    bad = [[rng.randrange(32, 127) for _ in range(2)] for _ in range(3)] if kind == 1 else []
    allowed = token_words(sorted(rng.sample(range(VOCAB), 300)) + [BYTE_EOS], WORDS).tobytes() if kind == 2 else None
    start, end = (ord("<"), [ord("e"), ord("!")]) if kind == 4 else (None, [])
    return RulesSpec(bad, allowed, [], [BYTE_EOS], 3 if kind == 3 else 0, start, end)


def _pick(rng: random.Random, row: np.ndarray) -> int:
    """A token the row allows (EOS now and then, favouring the reasoning tags), or now and then one it
    does not (the grammar must reject it alike on both sides)."""
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB])
    if rng.random() < 0.02:
        return int(rng.choice(sorted(set(range(VOCAB)) - set(allowed.tolist())) or [0]))
    favoured = [t for t in (ord("<"), ord("e"), ord("!")) if t in allowed]
    if favoured and rng.random() < 0.3:
        return rng.choice(favoured)
    others = [t for t in allowed.tolist() if t != BYTE_EOS]
    return BYTE_EOS if not others or (BYTE_EOS in allowed and rng.random() < 0.1) else rng.choice(others)


@pytest.fixture(scope="module")
def served():
    """An engine with grammar workers, all of them started (its pool also serves the mask test)."""
    llm = LLM(MODEL, dtype="float32", enforce_eager=True, max_num_seqs=32, max_model_len=512,
              structured_output_workers=WORKERS)
    llm.engine.core.grammars.wait_for_workers(every=True)
    yield llm
    llm.engine.shutdown()


def test_workers_masks_and_endings_equal_the_engine_process_ones(served):
    import xgrammar as xgr

    from tandem.engine.structured import stepping
    from tandem.engine.structured.compiler import compile_spec
    from tandem.engine.structured.matcher import RequestGrammar
    from tandem.engine.structured.rules import TokenRules
    from tandem.engine.structured.vocab import tokenizer_info
    info = tokenizer_info(MODEL, VOCAB, [BYTE_EOS])
    compiler, batch_fill = xgr.GrammarCompiler(info, max_threads=1), xgr.BatchGrammarMatcher(1)
    rng = random.Random(11)
    pool = served.engine.core.grammars.pool  # the engine is idle: its shared mask is this test's
    if True:
        grammars = [compile_spec(compiler, random_spec(rng)) for _ in range(6)]
        live = []  # [local rules, remote rules, tokens to feed, grammar id, rules spec]
        for i in range(30):
            compiled, spec = grammars[i % 6], _rules_spec(rng, i)
            local = TokenRules.from_spec(spec, RequestGrammar(compiled, [BYTE_EOS]))
            live.append([local, None, [], i % 6, spec])
        for r in live:  # requests share grammars: each worker is sent each once
            r[1] = pool.assign(1000 + r[3], lambda g=grammars[r[3]]: g.serialize_json(), r[4])  # not the engine's ids
        endings, rows_compared, slot = 0, 0, 0
        while live:
            fed = [r for r in live if r[2]]
            sent = pool.send([(r[1], r[2]) for r in fed], [(r[1], row, r[1].num_accepted + len(r[2]), ())
                                                           for row, r in enumerate(live)], slot)
            want_adv = stepping.advance([(r[0], r[2]) for r in fed], frozenset([BYTE_EOS]))
            ended = {id(r) for r, o in zip(fed, want_adv) if o[0] != stepping.ACCEPTED}
            local = np.zeros((len(live), WORDS), np.int32)
            want_fill = stepping.fill([(row, None if id(r) in ended else r[0], r[0].num_accepted, ())
                                       for row, r in enumerate(live)], local, batch_fill)
            answers, lost = pool.collect(sent)
            assert lost is None
            by_handle = {r[1].handle: r for r in live}
            got_adv = {id(by_handle[m.adv_handles[e]]): (k, t, x) for m, d in answers for e, k, t, x in d.advanced}
            assert got_adv == {id(r): o for r, o in zip(fed, want_adv) if o[0] != stepping.ACCEPTED}
            got_fill = sorted((m.fill_rows[e], k, s) for m, d in answers for e, k, s in d.filled)
            assert got_fill == sorted(want_fill)
            assert np.array_equal(pool.mask.slots[slot][:len(live)], local)
            rows_compared += len(live)
            dead = ended | {id(live[row]) for row, _, _ in want_fill}
            endings += len(dead)
            for r in [r for r in live if id(r) in dead]:
                pool.drop(r[1])
            for row, r in enumerate(live):
                r[2] = [] if id(r) in dead else [_pick(rng, local[row])]
            live = [r for r in live if id(r) not in dead]
            slot ^= 1
        assert rows_compared > 300 and endings == 30


def _engine(workers: int) -> LLM:
    return LLM(MODEL, dtype="float64", enforce_eager=True, seed=3, kv_cache_tokens=96, block_size=4,
               max_num_batched_tokens=16, max_num_seqs=8, structured_output_workers=workers)


def _cases() -> list[Case]:
    """Every request constrained (n > 1 siblings, bad words, reasoning), some aborted; a KV cache of 96
    tokens for up to 8 sequences: preemption."""
    cases = []
    for seed in (33, 31):
        cases.append(with_constraints(make_case(seed), share=1.0))
    return cases


def test_the_engine_with_workers_gives_the_outputs_of_the_engine_without():
    cases = _cases()
    assert any(r.abort_at is not None for c in cases for r in c.requests)
    runs = {}
    for workers in (0, WORKERS):
        llm = _engine(workers)
        engine = llm.engine
        try:
            for async_batching in (False, True) if workers else (False,):  # (async == sync: the differential's)
                engine.core.set_async(async_batching)
                for i, case in enumerate(cases):
                    engine.core.reset_prefix_cache()
                    runs[workers, async_batching, i] = drive_case(engine, case)
            preempted = engine.core.scheduler.num_preemptions
        finally:
            engine.shutdown()
        assert preempted > 0
    for i, case in enumerate(cases):
        want = runs[0, False, i]
        for key in [(WORKERS, False, i), (WORKERS, True, i)]:
            problems = compare(case, want, runs[key], ("in-process sync", f"{key}"))
            assert not problems, case.describe() + "\n" + "\n".join(problems)


def test_a_killed_worker_fails_its_requests_and_the_engine_serves_on(served):
    llm = served
    engine = llm.engine
    structured = engine.core.grammars
    spec = StructuredOutputsParams(regex="[a-z]{100}")
    for i in range(8):
        engine.add_request(f"r{i}", None, SamplingParams(seed=i, temperature=1.0, max_tokens=100,
                                                         structured_outputs=spec), prompt_token_ids=[1, 2, 3])
    for _ in range(4):
        engine.step()
    pool = structured.pool
    victim = next(p for p in pool.procs if p.handles)
    held = {structured._remote[h].request_id for h in victim.handles}
    os.kill(victim.popen.pid, signal.SIGKILL)
    errors, finished = {}, {}
    while engine.has_unfinished_requests():
        try:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0]
        except ValueError as exc:  # LLMEngine reports the failed requests' errors
            errors[str(exc)] = True
    failed = {rid for rid in held}
    assert errors and all("grammar worker process" in e for e in errors)
    assert all(finished[rid].finish_reason == "error" for rid in failed if rid in finished)
    survivors = [rid for rid in finished if rid not in failed]
    assert survivors and all(finished[rid].finish_reason in ("stop", "length") for rid in survivors)
    structured.wait_for_workers()  # started again (or the other one serves): new requests run
    outs = llm.generate(["hi"] * 3, SamplingParams(max_tokens=20, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"])), use_tqdm=False)
    assert all(o.outputs[0].text in ("yes", "no") for o in outs)
    popens = [p.popen for p in pool.procs if p.popen is not None]
    engine.shutdown()
    assert len(popens) == WORKERS and all(p.poll() is not None for p in popens)  # no worker left behind


def test_the_option_is_checked():
    from tandem.config import EngineConfig

    with pytest.raises(ValueError, match="structured_output_workers"):
        EngineConfig(MODEL, structured_output_workers=-1)
    assert EngineConfig(MODEL, structured_output_workers=3).grammar_workers == 3


def test_workers_that_cannot_start_fail_the_requests_that_need_them(monkeypatch):
    import tandem.engine.structured.workers as workers

    monkeypatch.setattr(workers.sys, "executable", "/bin/false")  # every worker exits at once
    llm = LLM(MODEL, dtype="float32", enforce_eager=True, max_num_seqs=4, max_model_len=128,
              structured_output_workers=1)
    try:
        with pytest.raises(ValueError, match=r"grammar workers \(structured_output_workers=1\) could not start"):
            llm.generate(["hi"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
                choice=["yes", "no"])), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        plain = llm.generate(["hi"], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(plain[0].outputs[0].token_ids) == 4  # the engine serves on
    finally:
        llm.engine.shutdown()
