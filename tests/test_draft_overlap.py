"""The draft model's speculating steps overlapped with the host (docs/pipeline.md, "Speculative
decoding"; ``worker/draft_plan.py`` on the host, ``worker/draft_window.py`` on the device): the
window the device builds equals the one read off the known tokens once the step in flight is
processed (the drained path's input); the draft's cache is caught up exactly (the target as its own
draft accepts every greedy proposal, also after steps sat out); and randomized cases give the tokens
of no speculation, sync == async, without draining."""
import random
from collections import Counter

import pytest
import torch

from differential import MODEL, make_case
from tandem.contract.step import StepOutput
from tandem.engine import core as engine_core
from tandem.engine.batch import build_step
from tandem.engine.block_manager import BlockManager, RowPool
from tandem.engine.scheduler import Scheduler, StepDeltas
from tandem.engine.sequence import Sequence
from tandem.engine.spec_path import accepted_count
from tandem.llm import LLM
from tandem.sampling_params import SamplingParams
from tandem.spec.proposer import ProposalRequest
from tandem.worker.draft_plan import DraftPlanner
from tandem.worker.draft_window import draft_part, window
from tandem.worker.model_runner import StepTensors, unpack
from tandem.worker.spec_lag import SpecLag
from test_spec_decode import _repetitive
from test_spec_overlap import KINDS, count_kinds, on_equals_off

K, BS, ROWS = 3, 4, 17


def _decoding(s: Scheduler, rng: random.Random) -> list[Sequence]:
    """Sequences of k + 1 tokens or more after their prefill, their first token known: they decode next."""
    seqs = [Sequence(f"r{i}", [rng.randrange(3, 50) for _ in range(rng.randint(K, 12))], SamplingParams(), seed=i,
                     max_new_tokens=40) for i in range(rng.randint(1, 5))]
    for seq in seqs:
        s.add(seq)
    out = s.schedule()
    s.update(out, StepOutput(out.step_id, [20 + i for i in range(len(seqs))]), StepDeltas())
    return seqs


def _placeholders(planner: DraftPlanner, seqs: list[Sequence], rng: random.Random) -> dict[str, list[int]]:
    """What ``Speculation.propose`` asks of an on-device proposer: per request, room placeholders."""
    chosen = [q for q in seqs if rng.random() < 0.8]
    requests = [ProposalRequest(q.request_id, q.prompt_token_ids + q.output_token_ids, rng.randint(1, K),
                                q.num_pending) for q in chosen]
    return {r.request_id: p for r, p in zip(requests, planner.propose(requests)) if p}


def _windows(seed: int) -> tuple[list, list, set[str]]:
    """Step N verifies proposals for some sequences (some rejected) and decodes others; step N+1 is
    planned with draft placeholders before N is processed. On the device: N's sampling stage
    (``record``), then N+1's first op (``resolve``) and each draft row's window -> (what the device
    built, what the drained path reads off the tokens known once N is processed, what N did for
    the rows: rejected some, accepted all, a plain decode)."""
    rng = random.Random(seed)
    s = Scheduler(8, 256, BlockManager(96, BS), RowPool(16), eos_token_ids=frozenset({3}))
    seqs = _decoding(s, rng)
    first = {q.request_id: [rng.randrange(4, 7) for _ in range(rng.randint(1, K))] for q in seqs if rng.random() < 0.7}
    step_n = s.schedule(first or None)
    built_n = build_step(step_n, BS)
    inputs_n = unpack(torch.from_numpy(built_n.data), built_n.shape)
    verified = inputs_n.draft_token.tolist()  # most draws agree with their proposal: long accepted runs
    drawn = torch.tensor([x if x >= 0 and rng.random() < 0.6 else rng.randrange(4, 7) for x in verified])
    known, row = {}, 0  # once N is processed: its accepted proposals and the draw after them
    for item in step_n.items:
        rows = drawn[row:row + item.num_samples].numpy()
        a = accepted_count(rows, item.proposals or [])
        known[item.seq.request_id] = item.seq.prompt_token_ids + item.seq.output_token_ids + rows[:a + 1].tolist()
        row += item.num_samples
    planner = DraftPlanner(K, 64, BS)
    step = s.schedule(_placeholders(planner, seqs, rng) or None)
    planned = planner.plan(build_step(step, BS), step)
    assert planned.shape.draft is not None
    lag, next_tokens = SpecLag(ROWS, torch.device("cpu")), torch.zeros(ROWS, dtype=torch.int64)
    lag.keep_draws(K + 1)
    lag.record(next_tokens, drawn, inputs_n.sample_rows, inputs_n.draft_token)
    data = torch.from_numpy(planned.data).clone()
    f = StepTensors(data, planned.shape)
    lag.resolve(f, planned.shape, BS)
    p = draft_part(data, planned.shape.num_words, planned.shape.draft)
    at = f.query_start[p["seq"]]
    first_id = torch.where(f.input_ids[at] < 0, next_tokens[(-f.input_ids[at] - 1).clamp(min=0)], f.input_ids[at])
    ids, start = window(p, K, f.positions[at], first_id, lag.draws[f.seq_rows[p["seq"]]])
    rows = [step.chunks[int(i)].seq for i in p["seq"]]  # (all chunks: a step with proposals plans none as decodes)
    kinds = {"plain" if q.request_id not in first else "rejected" if lag.rejected[q.row] else "all accepted"
             for q in rows}
    kinds |= {"two accepted" for q in rows if len(known[q.request_id]) - len(q.prompt_token_ids + q.output_token_ids) > 2}
    got = list(zip(ids.tolist(), start.tolist()))
    want = [(known[q.request_id][-K - 1:], len(known[q.request_id]) - K - 1) for q in rows]
    return got, want, kinds


@pytest.mark.parametrize("seed", range(8))
def test_the_device_window_is_the_window_of_the_known_tokens(seed):
    """Each draft row's window (its last k + 1 tokens, from the known tail, N's draws and N+1's
    resolved first token) and its first position equal the drained path's."""
    got, want, _ = _windows(seed)
    assert got == want


def test_the_windows_cover_rejections_and_plain_decodes():
    """The seeds above hold rows whose step in flight rejected proposals, accepted all of them, or
    was a plain decode, and rows whose window holds two accepted proposals or more."""
    kinds = set().union(*(_windows(seed)[2] for seed in range(8)))
    assert kinds == {"rejected", "all accepted", "plain", "two accepted"}, kinds


def test_the_target_as_its_own_draft_accepts_every_greedy_proposal_after_sitting_out(monkeypatch):
    """Two requests speculate; three short ones arrive (more than ``disable_by_batch_size``): steps do
    not speculate and the first two's draft caches fall behind; once the short ones finish they
    speculate again, and the device catches their caches up from the known tokens past what earlier
    calls left right. A wrong catch-up (or window) would make the target, its own draft, reject a
    greedy proposal. Sync and async."""
    from tandem.worker import draft_plan
    caught_up = []
    real = draft_plan.DraftPlanner._catch_up

    def spy(self, rows, held, tokens, first):
        caught_up.append(first)
        return real(self, rows, held, tokens, first)

    monkeypatch.setattr(draft_plan.DraftPlanner, "_catch_up", spy)
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    for async_batching in (False, True):
        llm = LLM("random:tiny", kv_cache_tokens=1024, block_size=4, async_batching=async_batching,
                  speculative_config={"method": "draft", "model": "random:tiny", "num_speculative_tokens": K,
                                      "disable_by_batch_size": 3})
        engine = llm.engine
        for i in range(2):
            engine.add_request(f"long{i}", None, greedy, prompt_token_ids=[(7 * i + j) % 97 + 3 for j in range(9)])
        for step in range(40):
            if step == 6:
                for i in range(3):
                    engine.add_request(f"short{i}", None, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                       prompt_token_ids=[(5 * i + j) % 89 + 3 for j in range(7)])
            engine.step()
        while engine.has_unfinished_requests():
            engine.step()
        stats = engine.core.stats()
        assert engine.core.spec_drains == 0 and engine.core.spec_overlapped > 0
        assert 0 < stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    assert any(first > 0 for first in caught_up)  # past an earlier call's window, not a prompt


@pytest.mark.parametrize("draft", ("random:tiny", "random:tiny-gemma2"))
@pytest.mark.parametrize("async_batching", [False, True])
def test_the_devices_proposals_are_the_drained_paths(async_batching, draft, monkeypatch):
    """Every proposal the device made equals the one the reference proposer makes from the tokens
    known once the step before it is processed (what the drained schedule proposed from; its own
    cache, the varlen path), with rejections in the steps before (seeded sampling: the lagged rows'
    windows shift). Float64, so no rounding tells the two forwards apart."""
    from tandem.worker import draft_plan
    from tandem.worker.draft import DraftProposer
    from tandem.worker.kv_cache import allocate_kv_cache
    compared = {"proposals": 0, "rejected": 0}
    reference = {}
    real = draft_plan.DraftPlanner.processed

    def check(self, sched, output):
        ref = reference["proposer"]
        row = len(sched.decode) if sched.decode is not None else 0
        for item in sched.chunks:
            if item.proposals:
                kk, seq = len(item.proposals), item.seq
                mine = output.draft_tokens[row:row + kk].tolist()
                request = ProposalRequest(seq.request_id, seq.prompt_token_ids + seq.output_token_ids, kk)
                assert ref.propose([request]) == [mine]
                compared["proposals"] += kk
                compared["rejected"] += mine != output.token_ids[row:row + kk].tolist()
            row += item.num_samples
        return real(self, sched, output)

    monkeypatch.setattr(draft_plan.DraftPlanner, "processed", check)
    llm = LLM("random:tiny", kv_cache_tokens=512, block_size=4, dtype="float64", async_batching=async_batching,
              speculative_config={"method": "draft", "model": draft, "num_speculative_tokens": K})
    worker = llm.engine.worker
    cache = allocate_kv_cache(worker.draft.kv_spec, worker.info.num_kv_blocks, 4, torch.device("cpu"), torch.float64)
    reference["proposer"] = DraftProposer(worker.draft, cache, 4, worker.info.max_model_len,
                                          worker.model.config.vocab_size, uniform=False)
    params = [SamplingParams(max_tokens=40, temperature=0.9, seed=i, ignore_eos=True) for i in range(3)]
    llm.generate([[11, 12, 13, 14] * 3, [5, 6, 7, 5, 6, 7], [40, 41, 40, 41, 40]], params, use_tqdm=False)
    assert compared["proposals"] > 0 and compared["rejected"] > 0, compared
    assert llm.engine.core.spec_drains == 0


@pytest.fixture
def cores(monkeypatch):
    """Every engine core made, to read its drain counters."""
    made = []
    real = engine_core.EngineCore.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(engine_core.EngineCore, "__init__", spy)
    return made


# seeds whose cases hold preemption, prefix-cache hits, aborts, penalties, seeded sampling, stop
# strings, min_tokens and structured output among them (asserted in aggregate below)
SEEDS = (3, 17, 19, 21)


def test_randomized_cases_give_the_tokens_of_no_speculation(cores):
    """Randomized cases (tiny KV caches, chunked prefill, prefix caching, aborts, stop strings and ids,
    min_tokens, penalties, logit bias, logprobs, structured output, n > 1; greedy and seeded) with a
    draft (the target itself, or another family), random k: on (sync, async) equals off, and no
    speculating step drained the device."""
    totals, kinds = Counter(), Counter()
    for seed in SEEDS:
        rng = random.Random(seed)
        spec = {"method": "draft", "model": rng.choice([MODEL, "random:tiny-gemma2"]),
                "num_speculative_tokens": rng.randint(1, 5), "disable_by_batch_size": rng.choice([2, 4, 32])}
        case = _repetitive(make_case(9000 + seed), seed)
        count_kinds(case, kinds)
        on_equals_off(case, spec, totals)
        assert all(core.spec_drains == 0 for core in cores[-2:])  # (the last two: on, sync and async)
        totals["overlapped"] += cores[-1].spec_overlapped
    assert all(totals[t] for t in ("preemptions", "hits", "drafts", "accepted", "rejected", "overlapped")), totals
    assert all(kinds[k] for k in KINDS), kinds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA executor and the draft's graphs (run on a GPU)")
def test_on_cuda_with_graphs_sync_equals_async():
    """The stream executor with decode and piecewise graphs and the draft's proposal graphs: no
    drain, sync equals async equals no speculation, every greedy proposal of the target as its own
    draft accepted (float32), and the draft's graphs were captured and replayed."""
    prompts = [[11, 12, 13, 14] * 3, [5, 6, 7, 5, 6, 7], [40, 41, 40, 41, 40], list(range(100, 190))]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    spec = {"method": "draft", "model": "random:tiny", "num_speculative_tokens": K}
    off = LLM("random:tiny", device="cuda", dtype="float32", kv_cache_tokens=2048).generate(prompts, params,
                                                                                           use_tqdm=False)
    for async_batching in (False, True):
        llm = LLM("random:tiny", device="cuda", dtype="float32", kv_cache_tokens=2048, async_batching=async_batching,
                  speculative_config=spec)
        on = llm.generate(prompts, params, use_tqdm=False)
        core = llm.engine.core
        stats = core.stats()
        assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
        assert core.spec_drains == 0 and core.spec_overlapped > 0
        assert 0 < stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
        assert core.speculation.proposer.graphs.graphs
