"""The Gemma family beyond parity with transformers (tests/test_hf_parity.py): async == sync and prefix
caching on == off on randomized workloads (the tiny Gemma presets: per-layer windows shorter than the
prompts, Gemma 2's soft-caps), the Triton kernels end to end against the SDPA reference, config fields
the family does not implement refused at load, and the floor model's sliding-window reads."""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import edited_copy as _edited
from differential import compare, make_case, run_case, run_case_with_stats, with_shared_prefixes

from tandem import LLM

MODELS = ["random:tiny-gemma2", "random:tiny-gemma3"]


@pytest.mark.parametrize("model", MODELS)
def test_async_matches_sync(model):
    for seed in range(3000, 3006):
        case = make_case(seed, model)
        problems = compare(case, run_case(case, async_batching=False), run_case(case, async_batching=True))
        assert not problems, case.describe() + "\n" + "\n".join(problems)


@pytest.mark.parametrize("model", MODELS)
def test_prefix_caching_on_matches_off(model):
    hits = 0
    for seed in range(3100, 3106):
        case = with_shared_prefixes(make_case(seed, model))
        off = run_case(case, async_batching=False, prefix_caching=False)
        on, stats = run_case_with_stats(case, async_batching=bool(seed % 2), prefix_caching=True)
        problems = compare(case, off, on, names=("off", "on"), aborts_may_differ=True)
        assert not problems, case.describe() + "\n" + "\n".join(problems)
        hits += stats.prefix_cache_hits
    assert hits > 0


ENGINE = r"""
import dataclasses, os, sys
sys.path.insert(0, "tests")
from differential import make_case, run_case

# Per-layer windows and (Gemma 2) soft-capped scores through the Triton decode and varlen kernels,
# interpreted on the CPU, against the SDPA reference: tokens exactly, logprobs to float32 rounding.
# Outputs end by 8 tokens, as each interpreted step is slow: the prompts (up to 40 tokens) already
# outrun the 16-token windows, and seed 7100's 64-token cache still preempts.
for model, seed in (("random:tiny-gemma2", 7100), ("random:tiny-gemma2", 7101), ("random:tiny-gemma3", 7102)):
    case = make_case(seed, model)
    for r in case.requests:
        r.params = dataclasses.replace(r.params, max_tokens=min(r.params.max_tokens, 8),
                                       min_tokens=min(r.params.min_tokens, 8))
    os.environ["TANDEM_ATTENTION"] = "sdpa"
    ref = run_case(case, async_batching=True, dtype="float32")
    os.environ["TANDEM_ATTENTION"] = "triton"
    got = run_case(case, async_batching=True, dtype="float32")
    assert got.keys() == ref.keys()
    for rid in ref:
        assert got[rid].matches(ref[rid], logprob_atol=1e-4), (model, seed, rid, got[rid], ref[rid])
print("engine ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton not installed (the test extra installs it)")
def test_triton_kernels_end_to_end_match_sdpa():
    root = Path(__file__).parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", ENGINE], capture_output=True, text=True, env=env, timeout=900,
                          cwd=root)
    assert proc.returncode == 0 and "engine ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("arch, change, named", [
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"attention_bias": True}, "attention_bias"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "chunked_attention"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "su", "rope_theta": 1e6}}}, "'su'"),
])
def test_fields_gemma_does_not_implement_are_refused_at_load(checkpoint_dir, tmp_path, arch, change, named):
    path = _edited(checkpoint_dir(arch), tmp_path / "edited", **change)
    with pytest.raises((NotImplementedError, ValueError), match=named):
        LLM(str(path), device="cpu", dtype="float32")


def test_multimodal_gemma3_is_refused_naming_why(checkpoint_dir, tmp_path):
    path = _edited(checkpoint_dir("gemma3"), tmp_path / "mm", architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(ValueError, match="multimodal"):
        LLM(str(path), device="cpu", dtype="float32")


def test_layer_kinds_default_to_the_architectures_pattern(checkpoint_dir, tmp_path):
    """A config without layer_types (hub files written before transformers 4.53): Gemma 2 alternates
    from a sliding layer 0, Gemma 3 follows sliding_window_pattern."""
    from tandem.model.model_config import load_model_config

    g2 = json.loads((checkpoint_dir("gemma2") / "config.json").read_text())
    g3 = json.loads((checkpoint_dir("gemma3") / "config.json").read_text())
    for cfg in (g2, g3):
        del cfg["layer_types"]
    g3.update(sliding_window_pattern=3, num_hidden_layers=4)
    for name, cfg, windows in (("g2", g2, (8, None, 8)), ("g3", g3, (8, 8, None, 8))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        assert load_model_config(tmp_path / name).windows == windows


def test_windowed_reads_count_what_each_query_sees():
    from types import SimpleNamespace

    import numpy as np

    from tandem.bench.step_log import windowed_reads

    rng = random.Random(0)
    for _ in range(200):
        window = rng.randint(1, 40)
        chunks = [SimpleNamespace(start=rng.randint(0, 80), num_tokens=rng.randint(1, 30)) for _ in range(3)]
        starts = np.array([rng.randint(0, 80) for _ in range(4)])
        seen = [(c.start + t, c.start + t + 1) for c in chunks for t in range(c.num_tokens)]  # (query, context)
        seen += [(s, s + 1) for s in starts]
        pairs = sum(min(ctx, window) for _, ctx in seen)
        kv = sum(len(set(k for t in range(c.num_tokens) for k in range(max(0, c.start + t - window + 1),
                                                                       c.start + t + 1))) for c in chunks)
        kv += int(np.minimum(starts + 1, window).sum())
        sched = SimpleNamespace(chunks=chunks, decode=SimpleNamespace(starts=starts))
        assert windowed_reads(sched, window) == (kv, pairs)


def test_floor_model_reads_at_most_the_window_on_sliding_layers():
    """Gemma 3 4B decode, 32 sequences at 4000 tokens: its 29 sliding layers read 1024 keys each, its
    5 global layers all 4000."""
    import torch

    from tandem.bench.roofline import FloorModel
    from tandem.bench.step_log import StepRecord
    from tandem.model.presets import preset_config

    cfg = preset_config("random:gemma3-4b")
    floor = FloorModel(cfg, torch.bfloat16)
    assert floor.windows == (1024,) and floor.layers_by_window == {1024: 29, None: 5}
    kv = 32 * 4000
    rec = StepRecord(0, num_tokens=32, num_seqs=32, num_decode=32, num_sampled=32, kv_tokens=kv, attn_pairs=kv,
                     t_begin=0, schedule_s=0, build_s=0, submit_s=0, windowed={1024: (32 * 1024, 32 * 1024)})
    per_layer_token = 2 * 4 * 256 * 2  # K and V x kv heads x head dim x bf16 bytes
    weights = cfg.num_params() + 32 * cfg.hidden_size  # the tied head read once, the embedding for 32 rows
    expected = weights * 2 + (29 * 32 * 1024 + 5 * kv + 34 * 32) * per_layer_token
    assert floor.step_cost(rec).bytes == pytest.approx(expected, rel=1e-9)
