"""Prefix caching through the whole engine: prefill saved, outputs unchanged, the option, recovery
after an interruption, sliding-window models, and the counters that reach /metrics and the bench."""
import random

import pytest

from tandem import LLM, SamplingParams
from tandem.bench.workload import LengthRange, Workload, make_requests
from tandem.server.messages import Stats
from tandem.server.metrics import ServerMetrics


class ComputedTokens:
    """A StepObserver counting the tokens each step computes."""

    def __init__(self) -> None:
        self.total = 0

    def step_submitted(self, sched, times) -> None:
        self.total += sched.num_tokens

    def step_processed(self, step_id, times) -> None:
        pass


def _llm(**options) -> LLM:
    return LLM("random:tiny", dtype="float64", kv_cache_tokens=2048, **options)


def test_a_repeated_long_prompt_is_not_prefilled_again():
    prompt = [random.Random(0).randrange(512) for _ in range(300)]
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    llm = _llm()
    counter = ComputedTokens()
    llm.engine.core.observers.append(counter)
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    computed_first, counter.total = counter.total, 0
    second = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert computed_first == 300 + 3
    assert counter.total == 300 - 288 + 3  # 18 blocks of 16 cached: 12 prompt tokens + 3 decodes
    assert second == first
    stats = llm.engine.core.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (600, 288)


def test_prefix_caching_can_be_turned_off():
    llm = _llm(enable_prefix_caching=False)
    prompt = list(range(100))
    for _ in range(2):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    stats = llm.engine.core.stats()
    assert not llm.engine.core.prefix_caching and stats.prefix_cache_queries == stats.prefix_cache_hits == 0


def test_an_interrupted_step_leaves_nothing_cached():
    """A step scheduled but never submitted registered blocks no step wrote: recovery forgets them."""
    llm = _llm()
    core = llm.engine.core
    llm.engine.add_request("a", None, SamplingParams(max_tokens=2), prompt_token_ids=list(range(64)))
    core.scheduler.schedule()  # ... and the interruption comes before the submit
    assert core.scheduler.cache.num_cached == 4
    llm.engine.abort_all()
    assert core.scheduler.cache.num_cached == 0
    assert core.scheduler.blocks.num_free == core.worker.info.num_kv_blocks - 1
    out = llm.generate([list(range(64))], SamplingParams(max_tokens=2), use_tqdm=False)  # still usable
    assert len(out[0].outputs[0].token_ids) == 2 and core.stats().prefix_cache_hits == 0


def test_sliding_window_models_keep_prefix_caching(checkpoint_dir, tmp_path):
    """Nothing frees a sequence's blocks that fall out of its window, so a cached block stays what its
    prefix computed: a Mistral with a window of 8 gives the same tokens with caching on (prefills
    skipped) as off (tests/test_gemma.py does the same for per-layer windows on random workloads)."""
    import json
    import shutil

    path = tmp_path / "mistral-window"
    shutil.copytree(checkpoint_dir("mistral"), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 8}))
    rng = random.Random(3)
    prefix = [rng.randrange(448) for _ in range(30)]
    prompts = [prefix + [rng.randrange(448) for _ in range(n)] for n in (2, 9, 0, 5)] + [prefix + [7, 8]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for caching in (False, True):
        llm = LLM(str(path), device="cpu", dtype="float32", block_size=8, max_num_seqs=2,
                  enable_prefix_caching=caching)
        assert llm.engine.core.prefix_caching == caching
        outs[caching] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.core.stats().prefix_cache_hits >= 4 * 24
    assert outs[True] == outs[False]


def test_metrics_export_prefix_cache_counters():
    metrics = ServerMetrics("m")
    metrics.on_stats(Stats(0, 0, 0.0, 0, None, 100, 40))
    metrics.on_stats(Stats(0, 0, 0.0, 0, None, 250, 90))
    text = metrics.render().decode()
    assert 'tandem:prefix_cache_queries_total{engine="0",model_name="m"} 250.0' in text
    assert 'tandem:prefix_cache_hits_total{engine="0",model_name="m"} 90.0' in text


def test_bench_prompts_share_a_prefix_and_keep_their_own_tokens():
    plain = make_requests(Workload(4, LengthRange(20, 30), LengthRange(2, 2)), 512)
    shared = make_requests(Workload(4, LengthRange(20, 30), LengthRange(2, 2), shared_prefix_len=12), 512)
    assert all(r.prompt[:12] == shared[0].prompt[:12] for r in shared)
    assert [r.prompt[12:] for r in shared] == [r.prompt[12:] for r in plain]
    assert shared[0].prompt == plain[0].prompt
    with pytest.raises(ValueError, match="shared_prefix_len"):
        Workload(4, LengthRange(20, 30), shared_prefix_len=21)
