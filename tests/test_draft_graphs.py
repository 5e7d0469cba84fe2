"""The draft model's fixed-shape proposal path (``worker/draft_graphs.py``, issue 27): the same
proposals as the varlen path over randomized request histories, padding rows and rows near
max_model_len writing only where they may, and the engine's tokens unchanged by draft speculation.
On the CPU the function runs eagerly; benchmarks/gpu_checks.py ``spec`` checks its CUDA graphs."""
import random

import numpy as np
import pytest
import torch

from tandem.llm import LLM
from tandem.model.loader import load_model
from tandem.sampling_params import SamplingParams
from tandem.spec.proposer import ProposalRequest
from tandem.worker.draft import DraftProposer
from tandem.worker.draft_graphs import DraftModel, run_eager
from tandem.worker.kv_cache import allocate_kv_cache

VOCAB = 512


def _model(name: str = "random:tiny"):
    return load_model(name, torch.device("cpu"), torch.float32, 512, seed=3)


def _proposer(model, num_blocks: int, block_size: int, max_model_len: int, uniform: bool) -> DraftProposer:
    cache = allocate_kv_cache(model.kv_spec, num_blocks, block_size, torch.device("cpu"), torch.float32)
    return DraftProposer(model, cache, block_size, max_model_len, VOCAB, uniform=uniform)


def _history(seed: int, model) -> None:
    """A simulated engine: requests come and go; each call some of them speculate (others decode
    without proposals meanwhile, so their caches fall behind), accept a random number of proposals
    and draw one token. Both proposers must propose the same tokens every call."""
    rng = random.Random(seed)
    block_size, max_model_len = rng.choice([4, 8, 16]), rng.choice([48, 64, 200])
    num_blocks = rng.choice([12, 64])
    uniform = _proposer(model, num_blocks, block_size, max_model_len, True)
    varlen = _proposer(model, num_blocks, block_size, max_model_len, False)
    live: dict[str, list[int]] = {}
    used = 0
    for call in range(30):
        while len(live) < rng.randint(1, 5):
            # some prompts shorter than k + 1, some at the edge of max_model_len
            n = rng.choice([1, 2, 3, rng.randint(4, 40), max_model_len - rng.randint(1, 5)])
            live[f"r{used}"] = [rng.randrange(VOCAB) for _ in range(n)]
            used += 1
        ids = [rid for rid in live if rng.random() < 0.8]
        requests = [ProposalRequest(rid, list(live[rid]), rng.randint(1, 4)) for rid in ids]
        got = uniform.propose(requests)
        assert got == varlen.propose(requests), (seed, call)
        for rid, proposed in zip(ids, got):
            accepted = proposed[:rng.randint(0, len(proposed))]
            live[rid] += accepted + [rng.randrange(VOCAB)]
        for rid in list(live):
            if rid not in ids and rng.random() < 0.5:
                live[rid] += [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]  # decoded meanwhile
            if len(live[rid]) >= max_model_len or rng.random() < 0.05:
                uniform.release(rid)
                varlen.release(rid)
                del live[rid]


@pytest.mark.parametrize("seed", range(12))
def test_uniform_proposals_equal_the_varlen_path(seed):
    _history(seed, _model())


def test_uniform_proposals_equal_the_varlen_path_on_another_family():
    model = _model("random:tiny-gemma2")  # sliding windows and soft-capping in its attention
    for seed in range(3):
        _history(100 + seed, model)


def test_uniform_proposals_equal_the_varlen_path_through_the_triton_kernels():
    """The kernels CUDA takes (varlen for the k + 1 tokens a row, decode after), under Triton's
    interpreter."""
    from test_triton_varlen import _run_interpreted

    script = ("import os; os.environ['TANDEM_ATTENTION'] = 'triton'\n"
              "import test_draft_graphs as t; t._history(1, t._model()); print('same proposals')")
    assert "same proposals" in _run_interpreted(script)


def test_the_uniform_path_serves_steady_rows():
    """Rows of k + 1 tokens or more take the fixed-shape function; shorter ones the varlen path."""
    model = _model()
    proposer = _proposer(model, 32, 8, 256, True)
    calls = []
    proposer._propose_varlen = lambda rows, k, f=proposer._propose_varlen: calls.append(len(rows)) or f(rows, k)
    proposer.propose([ProposalRequest("a", list(range(30)), 3), ProposalRequest("b", [1, 2], 3)])
    assert calls == [1]  # only "b"
    proposer.propose([ProposalRequest("a", list(range(32)), 3), ProposalRequest("b", [1, 2, 3, 4, 5], 3)])
    assert calls == [1]


def _rows(rng: random.Random, block_size: int, k: int):
    """Two rows with their own blocks and k + 1 last tokens; the second keeps fewer proposals."""
    n = [rng.randint(k + 1, 20), rng.randint(k + 1, 20)]
    kk = np.array([k, 1], np.int64)
    blocks = [[1, 2, 3, 4], [5, 6, 7, 8]]
    width = max(-(-(m - 1 + kr) // block_size) for m, kr in zip(n, kk))
    table = np.array([b[:width] for b in blocks], np.int64)
    ids = np.array([[rng.randrange(VOCAB) for _ in range(k + 1)] for _ in n], np.int64)
    return ids, np.array([m - k - 1 for m in n], np.int64), kk, table, n


def test_padding_rows_and_short_rows_write_only_where_they_may():
    """Padding rows (a graph bucket's: kk 0, table of zeros) change nothing but block 0 and do not
    change the real rows' drafts; a row keeping fewer than k proposals writes no K/V past its last
    kept position."""
    rng, bs, k = random.Random(0), 8, 4
    model = _model()
    cache = torch.randn(model.kv_spec.num_layers, 2, 10 * bs, model.kv_spec.num_kv_heads, model.kv_spec.head_dim)
    draft = DraftModel(model, cache, bs, VOCAB)
    ids, start, kk, table, n = _rows(rng, bs, k)
    before = cache.clone()
    with torch.inference_mode():
        plain = run_eager(draft, ids, start, kk, table)
        after_plain = cache.clone()
        cache.copy_(before)
        pad = lambda a: np.pad(a, [(0, 3)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
        padded = run_eager(draft, pad(ids), pad(start), pad(kk), pad(table))
    assert torch.equal(padded[:2], plain)
    # padding rows: block 0 only (the real rows' K/V may differ in the last bits: other batch shapes)
    written = lambda c: set(torch.nonzero((c != before).any(1).any(-1).any(-1).any(0)).flatten().tolist())  # noqa: E731
    assert written(cache) - set(range(bs)) == written(after_plain) - set(range(bs))
    assert torch.allclose(cache[:, :, bs:], after_plain[:, :, bs:], atol=1e-5)
    short_last = n[1] + kk[1] - 2  # position of row 1's last kept K/V
    slots = [table[1, p // bs] * bs + p % bs for p in range(short_last + 1, table.shape[1] * bs)]
    assert torch.equal(after_plain[:, :, slots], before[:, :, slots])


@pytest.mark.parametrize("async_batching", [False, True])
@pytest.mark.parametrize("draft", ["random:tiny", "random:tiny-gemma2"])
def test_greedy_tokens_with_draft_speculation_equal_those_without(async_batching, draft):
    """Prompts shorter than k + 1, long ones (catch-up) and a run to max_model_len (90 + 38)."""
    rng = random.Random(7)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 3, 17, 40, 90)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (25, 40, 12, 30, 38)]
    options = dict(kv_cache_tokens=1024, max_model_len=128, dtype="float32", seed=1)
    off = LLM("random:tiny", **options).generate(prompts, params, use_tqdm=False)
    llm = LLM("random:tiny", async_batching=async_batching, **options,
              speculative_config={"method": "draft", "model": draft, "num_speculative_tokens": 4})
    on = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert llm.engine.core.stats().spec_num_drafts > 0
