"""The FP8 KV cache (``kv_cache_dtype="fp8"``): e4m3 storage with per-tensor scales.

The reference rounds K and V through e4m3 explicitly (``round_e4m3`` here, written from the
definition: x / scale in float32, saturated to +-448, cast, times scale) into a cache of the model
dtype. The Triton kernels (decode, split-KV, varlen, the fused rotary + store) run through Triton's
interpreter in a subprocess (TRITON_INTERPRET must be set before Triton is imported); the engine runs
the SDPA path on the CPU and, interpreted, the Triton path."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from differential import compare, make_case, run_case, with_shared_prefixes
from tandem.config import EngineConfig
from tandem.model.attention.base import AttentionSpec
from tandem.model.base import KVSpec
from tandem.worker import kv_cache
from tandem.worker.kv_cache import plan_num_blocks, resolve_kv_dtype

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed (the test extra installs it)")


def round_e4m3(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x after a trip through an fp8 cache with this scale, in x's dtype."""
    return ((x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def test_option_is_checked_and_resolved():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model="random:tiny", kv_cache_dtype="int8")
    cpu = torch.device("cpu")
    assert resolve_kv_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_kv_dtype("fp8", torch.float32, cpu) == resolve_kv_dtype("fp8_e4m3", torch.float32, cpu)
    assert resolve_kv_dtype("fp8", torch.float32, cpu) == torch.float8_e4m3fn


def test_plan_holds_twice_the_tokens(monkeypatch):
    """The same KV memory holds twice the tokens in fp8 as in bf16 (the plan divides by the element size)."""
    spec = KVSpec(4, 64, (AttentionSpec(0.125),) * 6)
    assert spec.bytes_per_token(torch.bfloat16) == 2 * spec.bytes_per_token(torch.float8_e4m3fn)
    budget = 1000 * spec.bytes_per_token(torch.bfloat16)
    monkeypatch.setattr(kv_cache, "gpu_kv_budget_bytes", lambda device, utilization, reserved: budget)
    cuda = torch.device("cuda")  # only the plan's arithmetic runs: no GPU is touched
    blocks = {dt: plan_num_blocks(None, 16, 0.9, spec, cuda, dt) for dt in (torch.bfloat16, torch.float8_e4m3fn)}
    assert blocks[torch.bfloat16] == 1000 // 16 + 1 and blocks[torch.float8_e4m3fn] == 2000 // 16 + 1


def test_store_rounds_saturates_and_scales():
    from tandem.model.layers.kv import store_kv

    torch.manual_seed(0)
    cache = torch.zeros(2, 8, 2, 4, dtype=torch.float8_e4m3fn)
    k, v = 30 * torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    k[0, 0, 0] = 1e6  # past 448 * scale: saturates, where a plain cast would give NaN
    slots = torch.tensor([5, 1, 6])
    store_kv(cache, k, v, slots, 0.25, 2.0)
    assert torch.equal(cache[0, slots].float() * 0.25, round_e4m3(k, 0.25))
    assert torch.equal(cache[1, slots].float() * 2.0, round_e4m3(v, 2.0))
    assert cache[0, 5, 0, 0].float() == 448.0 and not cache.float().isnan().any()
    assert not torch.equal(round_e4m3(k, 0.25), k)  # the rounding is real at these values
    others = torch.ones(8, dtype=torch.bool)
    others[slots] = False
    assert (cache[:, others].float() == 0).all()


KERNELS = r"""
import itertools, torch
from test_kv_fp8 import round_e4m3
from test_triton_varlen import make_paged_cache, rel_err
from tandem.kernels import fused
from tandem.kernels.paged_decode import paged_decode_attention
from tandem.kernels.paged_varlen import paged_varlen_attention
from tandem.model.attention import AttentionInputs
from tandem.model.attention.base import AttentionSpec
from tandem.model.attention.sdpa import SdpaBackend
from tandem.model.layers import kv, rotary

def check(seed, hq, hkv, d, page, chunks, window, k_scale, v_scale, splits=(), cap=None):
    # The kernels on an fp8 cache against SDPA on a float32 cache holding the same values rounded
    # through e4m3 explicitly (scale 1 in its spec), and against SDPA's own fp8 path; the reference
    # on the unrounded values must differ (the rounding is visible at these magnitudes).
    torch.manual_seed(seed)
    q_lens, lens = [c[0] for c in chunks], [c[1] for c in chunks]
    exact, bt = make_paged_cache(lens, page, hkv, d)
    exact[0] *= 40 * k_scale  # some keys past 448 * k_scale: saturated
    exact[1] *= 50 * v_scale
    cache = torch.stack([(exact[0] / k_scale).clamp(-448, 448), (exact[1] / v_scale).clamp(-448, 448)])
    cache = cache.to(torch.float8_e4m3fn)
    rounded = torch.stack([round_e4m3(exact[0], k_scale), round_e4m3(exact[1], v_scale)])
    query_start = torch.tensor([0, *itertools.accumulate(q_lens)])
    positions = torch.cat([torch.arange(n - m, n) for m, n in zip(q_lens, lens)])
    q, seq_lens = 0.05 * torch.randn(len(positions), hq, d), torch.tensor(lens)
    spec = AttentionSpec(d ** -0.5, window, cap, k_scale=k_scale, v_scale=v_scale)
    sdpa = SdpaBackend()
    meta = sdpa.prepare(AttentionInputs(torch.zeros(len(positions), dtype=torch.long), bt, query_start, seq_lens,
                                        positions, max(q_lens), page))
    ref = sdpa.attend(q, rounded, meta, AttentionSpec(d ** -0.5, window, cap))
    assert rel_err(sdpa.attend(q, cache, meta, spec), ref) < 1e-6
    assert rel_err(sdpa.attend(q, exact, meta, AttentionSpec(d ** -0.5, window, cap)), ref) > 1e-3
    errs = [rel_err(paged_varlen_attention(q, cache, bt, query_start, seq_lens, page, spec.scale, window, max(q_lens),
                                           cap, k_scale=k_scale, v_scale=v_scale), ref)]
    for n in splits:  # decode steps: the decode kernel, single pass and split-KV
        errs.append(rel_err(paged_decode_attention(q, cache, bt, seq_lens, page, spec.scale, window, num_splits=n,
                                                   softcap=cap, k_scale=k_scale, v_scale=v_scale), ref))
    assert max(errs) < 1e-5, (seed, chunks, window, k_scale, v_scale, errs)
    # a cache of the model dtype holds K and V themselves: the layer's scales must not touch it
    plain = paged_varlen_attention(q, rounded, bt, query_start, seq_lens, page, spec.scale, window, max(q_lens),
                                   cap, k_scale=k_scale, v_scale=v_scale)
    assert rel_err(plain, ref) < 1e-5 and rel_err(sdpa.attend(q, rounded, meta, spec), ref) < 1e-6
    if splits:
        plain = paged_decode_attention(q, rounded, bt, seq_lens, page, spec.scale, window, num_splits=splits[-1],
                                       softcap=cap, k_scale=k_scale, v_scale=v_scale)
        assert rel_err(plain, ref) < 1e-5
    return max(errs)

errs = [
    check(30, 8, 2, 16, 4, [(1, 1), (5, 40), (37, 100)], None, 1.0, 1.0),
    check(31, 6, 2, 24, 16, [(20, 150), (13, 13)], 50, 0.02, 3.0),
    check(32, 4, 2, 32, 8, [(1, 5), (1, 300), (1, 700)], None, 0.5, 0.1, splits=(1, 4)),
    check(33, 8, 2, 16, 4, [(1, 600), (1, 37)], 200, 1.0, 1.0, splits=(1, 2)),
    # soft-capped scores (Gemma 2): k_scale joins the scale inside the tanh
    check(34, 4, 2, 16, 8, [(1, 300), (1, 60)], None, 0.05, 0.2, splits=(1, 2), cap=0.5),
    check(35, 4, 2, 16, 8, [(9, 60), (20, 20)], 30, 0.05, 0.2, cap=0.5),
]

# The fused rotary + store writes the bytes store_kv writes (rotated K, V over their scales).
torch.manual_seed(1)
qkv = 20 * torch.randn(7, (6 + 2 + 2) * 24)
q, k, v = qkv[:, :144].view(7, 6, 24), qkv[:, 144:192].view(7, 2, 24), qkv[:, 192:].view(7, 2, 24)
cos, sin = rotary.rope_cos_sin(24, 10000.0, None, 64, torch.device("cpu"))
pos, slots = torch.tensor([0, 3, 9, 63, 1, 2, 40]), torch.tensor([5, 17, 2, 30, 11, 8, 23])
for k_scale, v_scale in ((1.0, 1.0), (0.03, 0.5)):
    cache = torch.zeros(2, 32, 2, 24, dtype=torch.float8_e4m3fn)
    ref_cache = cache.clone()
    kv.store_kv(ref_cache, rotary.apply_rope(k, cos[pos], sin[pos]), v, slots, k_scale, v_scale)
    fused.rope_store_kv_(q.clone(), k, v, pos, cos, sin, cache, slots, k_scale, v_scale)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), (k_scale, v_scale)
    assert (ref_cache.float().abs() == 448).any() == (k_scale < 1)  # the small scale saturates some keys
# Every e4m3 value, the midpoints between neighbours (ties go to the even one), values that saturate
# or flush to zero, both signs: through V at position 0, the bytes torch's cast gives.
grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
grid = grid[~grid.isnan()].sort().values
vals = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([1e6, -1e6, 449.0, 470.0, 1e-9, -1e-9])])
n_tok = -(-len(vals) // 48)
v = torch.cat([vals, torch.ones(n_tok * 48 - len(vals))]).view(n_tok, 2, 24)
k = torch.randn(n_tok, 2, 24)
for v_scale in (1.0, 0.5):
    cache = torch.zeros(2, n_tok, 2, 24, dtype=torch.float8_e4m3fn)
    fused.rope_store_kv_(torch.randn(n_tok, 2, 24), k, v * v_scale, torch.zeros(n_tok, dtype=torch.long), cos, sin,
                         cache, torch.arange(n_tok), 1.0, v_scale)
    want = v.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(cache[1].view(torch.uint8), want.view(torch.uint8)), v_scale
print("max rel err", max(errs))
"""


def _run_interpreted(script: str, env_extra: dict | None = None) -> str:
    root = Path(__file__).parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
           **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_triton
def test_kernels_on_fp8_cache_match_rounded_reference():
    assert "max rel err" in _run_interpreted(KERNELS)


@needs_triton
def test_fp8_kernels_compile_for_h100():
    """The kernels' fp8 variants compile for sm_90 (the interpreter accepts what the compiler may not)."""
    from tandem.kernels import fused, paged_decode, paged_varlen
    from test_triton_compile import _compile

    io = {"*": "*bf16", "cache_ptr": "*fp8e4nv", "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64",
          "query_start_ptr": "*i64", "part_acc_ptr": "*fp32", "part_stats_ptr": "*fp32"}
    for splits in (1, 4):
        _compile(paged_decode._paged_decode_kernel, io,
                 dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, DIM_PAD=128, PAGE=16, BLOCK_N=64, NUM_SPLITS=splits,
                      MIN_SPLIT=256, SOFTCAP=False, PRECISION="tf32"))
    _compile(paged_varlen._paged_varlen_kernel, io, dict(GROUP=4, HEAD_DIM=128, DIM_PAD=128, PAGE=16, BLOCK_M=64,
                                                         BLOCK_N=64, SOFTCAP=False, PRECISION="tf32"))
    _compile(fused._rope_store_kv_kernel, {"*": "*bf16", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv",
                                           "pos_ptr": "*i64", "slot_ptr": "*i64"},
             dict(HALF=64, HALF_PAD=64, Q_PAD=32, KV_PAD=8, FP8_MANTISSA=3, FP8_MIN_EXP=-6, FP8_MAX=448.0))


ENGINE = r"""
import dataclasses, os
from differential import compare, make_case, run_case

# The engine with the Triton kernels (decode, varlen prefill / mixed steps) on an fp8 cache,
# interpreted on the CPU, against the SDPA path on the same fp8 cache: the same tokens, logprobs up
# to float32 rounding of two attention kernels.
case = make_case(7003)
case = dataclasses.replace(case, engine={**case.engine, "kv_cache_dtype": "fp8"})
os.environ["TANDEM_ATTENTION"] = "sdpa"
ref = run_case(case, async_batching=True, dtype="float32")
os.environ["TANDEM_ATTENTION"] = "triton"
got = run_case(case, async_batching=True, dtype="float32")
problems = compare(case, ref, got, names=("sdpa", "triton"), logprob_atol=1e-4)
assert not problems, case.describe() + "\n" + "\n".join(problems)
print("engine ok")
"""


@needs_triton
def test_engine_fp8_triton_kernels_match_sdpa():
    assert "engine ok" in _run_interpreted(ENGINE)


def _fp8(case):
    return dataclasses.replace(case, engine={**case.engine, "kv_cache_dtype": "fp8"})


def _rounding_store():
    """A ``store_kv`` for a cache of the model dtype that rounds K and V through e4m3 first."""
    from tandem.model.layers.kv import store_kv

    def store(cache, k, v, slot_mapping, k_scale=1.0, v_scale=1.0):
        assert cache.dtype != torch.float8_e4m3fn
        store_kv(cache, round_e4m3(k, k_scale), round_e4m3(v, v_scale), slot_mapping)
    return store


def test_engine_fp8_matches_explicit_rounding(monkeypatch):
    """The engine with an fp8 cache (SDPA path, CPU) gives the outputs of a float cache that holds
    K/V rounded through e4m3, logprobs included, while a float cache without rounding gives other
    logprobs somewhere. Async == sync and prefix caching on == off, all with the fp8 cache."""
    from tandem.model.models import llama

    visible = False
    for seed in (2500,):  # a randomized case: chunked prefill, preemption, aborts, sampling, logprobs
        case = with_shared_prefixes(make_case(seed))
        fp8_sync = run_case(_fp8(case), async_batching=False)
        fp8_async = run_case(_fp8(case), async_batching=True)
        fp8_off = run_case(_fp8(case), async_batching=True, prefix_caching=False)
        plain = run_case(case, async_batching=False)
        with monkeypatch.context() as patch:
            patch.setattr(llama, "store_kv", _rounding_store())
            rounded = run_case(case, async_batching=False)
        assert not compare(case, rounded, fp8_sync, names=("rounded", "fp8")), case.describe()
        assert not compare(case, fp8_sync, fp8_async), case.describe()
        assert not compare(case, fp8_off, fp8_async, names=("off", "on"), aborts_may_differ=True), case.describe()
        visible |= bool(compare(case, plain, fp8_sync, names=("plain", "fp8")))
    assert visible, "the e4m3 rounding changed no output: the test cannot tell fp8 from the model dtype"


def _greedy(model: str, impl: str, kv: str) -> list[tuple]:
    from tandem.llm import LLM
    from tandem.sampling_params import SamplingParams

    llm = LLM(model, dtype="float32", device="cpu", kv_cache_tokens=256, block_size=4, kv_cache_dtype=kv,
              model_impl=impl)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22] * 5]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, logprobs=2), use_tqdm=False)
    llm.engine.shutdown()
    return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("model,impl,module", [
    ("random:tiny-gemma2", "auto", "gemma"),  # its own store, windows and soft-caps
    ("random:tiny", "transformers", "transformers_attention"),  # transformers' modeling code, tandem's cache
])
def test_other_forwards_honour_fp8(model, impl, module, monkeypatch):
    """Gemma's forward and the transformers backend store into an fp8 cache as Llama's does: their
    outputs (logprobs included) equal the explicitly rounded reference's, not the unrounded ones."""
    import importlib

    fp8 = _greedy(model, impl, "fp8")
    assert fp8 != _greedy(model, impl, "auto")  # the rounding shows in the logprobs
    monkeypatch.setattr(importlib.import_module(f"tandem.model.models.{module}"), "store_kv", _rounding_store())
    assert fp8 == _greedy(model, impl, "auto")


def test_floor_counts_one_byte_per_kv_element():
    from tandem.bench.roofline import FloorModel
    from tandem.bench.step_log import StepRecord
    from tandem.model.presets import preset_config

    cfg = preset_config("random:llama3-8b")
    rec = StepRecord(0, num_tokens=8, num_seqs=8, num_decode=8, num_sampled=8, kv_tokens=8 * 4000,
                     attn_pairs=8 * 4000, t_begin=0, schedule_s=0, build_s=0, submit_s=0)
    bf16 = FloorModel(cfg, torch.bfloat16).step_cost(rec)
    fp8 = FloorModel(cfg, torch.bfloat16, kv_dtype=torch.float8_e4m3fn).step_cost(rec)
    kv_elements = 32 * 2 * 8 * 128 * (8 * 4000 + 8)  # layers x (K, V) x KV heads x head dim x (read + written)
    assert bf16.bytes - fp8.bytes == kv_elements and bf16.flops == fp8.flops


def test_bench_reports_the_kv_cache_dtype(tmp_path, capsys):
    import json

    from tandem.cli import main

    out = tmp_path / "run.json"
    assert main(["bench", "--model", "random:tiny", "--kv-cache-dtype", "fp8", "--num-requests", "2", "--prompt-len",
                 "5", "--max-tokens", "3", "--modes", "async", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kv_cache_dtype"] == "float8_e4m3fn"
    assert "KV cache float8_e4m3fn)" in capsys.readouterr().out


# --- KV cache scales from a checkpoint -------------------------------------------------------------

def _with_kv_scales(src: Path, dst: Path, scales: dict[str, float], scheme: dict | None = None) -> Path:
    """A copy of checkpoint ``src`` with the given scale tensors added (one float32 value each, shape
    [1] as llm-compressor writes them) and, if given, kv_cache_scheme in its quantization_config."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    tensors.update({name: torch.tensor([value]) for name, value in scales.items()})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if scheme is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.setdefault("quantization_config", {})["kv_cache_scheme"] = scheme
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _layer_scales(n_layers: int, k: float, v: float) -> dict[str, float]:
    return {**{f"model.layers.{i}.self_attn.k_scale": k * (i + 1) for i in range(n_layers)},
            **{f"model.layers.{i}.self_attn.v_scale": v * (i + 1) for i in range(n_layers)}}


def _checkpoint_greedy(path: Path, kv: str) -> list[tuple]:
    from tandem.llm import LLM
    from tandem.sampling_params import SamplingParams

    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256, kv_cache_dtype=kv)
    outs = llm.generate([[5, 9, 200, 31, 7, 88, 120], [300, 2, 2, 8]],
                        SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True), use_tqdm=False)
    llm.engine.shutdown()
    return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in o.outputs[0].logprobs])
            for o in outs]


def test_checkpoint_kv_scales_are_used(checkpoint_dir, tmp_path, monkeypatch):
    """A checkpoint's per-layer k_scale / v_scale (compressed-tensors' kv_cache_scheme on an FP8
    checkpoint) reach the fp8 cache: outputs equal a float cache rounded through e4m3 with those
    scales, and differ from the fp8 cache at scale 1."""
    from fp8_checkpoints import fp8_checkpoint
    from tandem.model.models import llama

    fp8_weights, _ = fp8_checkpoint(checkpoint_dir("llama"), tmp_path / "w", "ct-channel")
    n_layers = len({n.split(".")[2] for n in _safetensor_names(fp8_weights) if n.startswith("model.layers.")})
    scaled = _with_kv_scales(fp8_weights, tmp_path / "kv", _layer_scales(n_layers, 0.004, 0.003), SCHEME)
    got = _checkpoint_greedy(scaled, "fp8")
    assert got != _checkpoint_greedy(fp8_weights, "fp8")  # the scales change the rounding
    with monkeypatch.context() as patch:
        patch.setattr(llama, "store_kv", _rounding_store())
        assert got == _checkpoint_greedy(scaled, "auto")  # the rounding store takes the layers' scales


def _safetensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_checkpoint_kv_scales_refusals(checkpoint_dir, tmp_path):
    from tandem.llm import LLM
    from tandem.model.kv_scales import check_kv_cache_scheme

    check_kv_cache_scheme(SCHEME)
    for field, value in (("strategy", "channel"), ("dynamic", True), ("num_bits", 4), ("type", "int")):
        with pytest.raises(NotImplementedError, match=f"kv_cache_scheme sets {{'{field}'"):
            check_kv_cache_scheme({**SCHEME, field: value})
    src = checkpoint_dir("llama")
    legacy = _with_kv_scales(src, tmp_path / "one", {"model.layers.0.self_attn.kv_scale": 0.01})
    with pytest.raises(ValueError, match="layer 1 has no self_attn.k_scale.*other layers have them"):
        LLM(str(legacy), device="cpu", kv_cache_tokens=64)
    bad = _with_kv_scales(src, tmp_path / "neg", _layer_scales(2, -0.01, 0.01))
    with pytest.raises(ValueError, match="must be one positive finite value"):
        LLM(str(bad), device="cpu", kv_cache_tokens=64)
    ok = _with_kv_scales(src, tmp_path / "ok", _layer_scales(2, 0.01, 0.01))
    with pytest.raises(NotImplementedError, match="not the transformers backend"):
        LLM(str(ok), device="cpu", kv_cache_tokens=64, model_impl="transformers")
