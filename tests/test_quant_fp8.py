"""FP8 weights (issue 25): quantization_config parsing and refusals, the FP8 weight's arithmetic, and
engine runs of FP8 checkpoints in each format against the float32 model with the dequantized weights
(CPU: weights are dequantized at load, so the tokens must be identical)."""
from __future__ import annotations

import json

import pytest
import torch

from fp8_checkpoints import FORMATS, fp8_checkpoint, quantize
from tandem import LLM, SamplingParams
from tandem.model.quant.config import ONLINE_FP8, parse_quantization_config, resolve_quantization
from tandem.model.quant.fp8 import Fp8Weight, quantize_activations, quantize_per_channel, reference_linear
from tandem.model.quant.linear import cat_rows, linear, weight_bytes
from tandem.model.quant.reader import QuantizedGetter, _block_part
from tandem.model.tp_layout import Part

PROMPTS = [[5, 9, 200, 31, 7, 88, 120], [300, 2, 2, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _tokens(path, **options) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", max_model_len=64, kv_cache_tokens=256, **options)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fp8_checkpoint_matches_its_dequantized_float32_model(checkpoint_dir, tmp_path, fmt):
    fp8, ref = fp8_checkpoint(checkpoint_dir("llama"), tmp_path / fmt, fmt)
    assert _tokens(fp8) == _tokens(ref)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "qwen3_moe"])
def test_other_families_load_fp8_checkpoints(checkpoint_dir, tmp_path, arch):
    """q/k/v biases (Qwen2), Gemma's layers, a mixture of experts (its experts dequantized)."""
    fp8, ref = fp8_checkpoint(checkpoint_dir(arch), tmp_path / arch, "ct-channel")
    assert _tokens(fp8) == _tokens(ref)


def test_the_quantization_option(checkpoint_dir, tmp_path):
    fp8, _ = fp8_checkpoint(checkpoint_dir("qwen3"), tmp_path / "q", "ct-channel")
    assert _tokens(fp8, quantization="fp8") == _tokens(fp8)
    with pytest.raises(ValueError, match="quantization='none' but the checkpoint is quantized.*compressed-tensors"):
        LLM(str(fp8), device="cpu", quantization="none")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(fp8), device="cpu", quantization="int3")


def test_fp8_at_load_of_an_unquantized_model_rounds_only_the_projections(checkpoint_dir):
    """``--quantization fp8`` on a float checkpoint: per-channel FP8 projections (here dequantized
    again: CPU), everything else as stored."""
    from tandem.model.loader import CheckpointReader

    path = checkpoint_dir("llama")
    reader = CheckpointReader(path, torch.device("cpu"), torch.float32)
    get = QuantizedGetter(reader.get, ONLINE_FP8, torch.device("cpu"), torch.float32)
    name, shape = "model.layers.1.self_attn.q_proj.weight", (96, 64)
    dense = reader.get(name, shape)
    rounded = get.linear(name, shape)
    assert torch.equal(rounded, quantize(dense, FORMATS["ct-channel"])[2])  # the helper's own arithmetic
    assert not torch.equal(rounded, dense)
    assert torch.equal(get("model.embed_tokens.weight", (448, 64)), reader.get("model.embed_tokens.weight", (448, 64)))


def test_random_preset_quantized_at_load_runs():
    llm = LLM("random:tiny", device="cpu", quantization="fp8", kv_cache_tokens=256)
    plain = LLM("random:tiny", device="cpu", kv_cache_tokens=256)
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert all(len(t) == 10 for t in out)
    assert sum(a == b for x, y in zip(out, ref) for a, b in zip(x, y)) >= 10  # FP8 rounding, same model


# --- quantization_config parsing -------------------------------------------------------------------

def test_each_format_parses_to_its_description():
    got = {name: parse_quantization_config(json.loads(json.dumps(f.config).replace('"EXCLUDED"', '"x"')))
           for name, f in FORMATS.items()}
    assert (got["ct-tensor"].weights, got["ct-tensor"].activations) == ("tensor", "static")
    assert (got["ct-channel"].weights, got["ct-channel"].activations) == ("channel", "dynamic")
    assert (got["ct-block"].block, got["ct-block"].scale_suffix) == ((32, 32), "weight_scale")
    assert (got["fp8-block"].block, got["fp8-block"].scale_suffix) == ((16, 16), "weight_scale_inv")
    assert (got["fp8-tensor"].weights, got["fp8-tensor"].activations) == ("tensor", "static")
    assert got["fbgemm"].activation_scale_ub == 1200.0
    ct = parse_quantization_config({**FORMATS["ct-channel"].config, "ignore": ["lm_head", "re:.*mlp\\.gate$"]})
    assert not ct.quantizes("lm_head") and not ct.quantizes("model.layers.3.mlp.gate")
    assert ct.quantizes("model.layers.3.mlp.gate_proj") and ct.quantizes("model.layers.0.self_attn.q_proj")
    fp8 = got["fp8-block"]
    assert not fp8.quantizes("model.x.lm_head") and fp8.quantizes("model.layers.0.mlp.up_proj")


def _ct_with(weights=None, inputs=None, **top):
    cfg = json.loads(json.dumps(FORMATS["ct-channel"].config))
    group = cfg["config_groups"]["group_0"]
    group["weights"].update(weights or {})
    group["input_activations"].update(inputs or {})
    return {**cfg, **top}


@pytest.mark.parametrize("q, named", [
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
    (_ct_with({"num_bits": 4, "type": "int"}), "weights num_bits=4 type='int'"),
    (_ct_with({"strategy": "group", "group_size": 128}), "weights strategy='group'"),
    (_ct_with({"group_size": 64}), "weights group_size=64"),
    (_ct_with({"symmetric": False}), "weights symmetric=False"),
    (_ct_with(inputs={"strategy": "tensor", "dynamic": True}), "input_activations strategy='tensor' dynamic=True"),
    (_ct_with(format="pack-quantized"), "pack-quantized with quantized activations"),  # 4-bit: W4A16 only
    ({**_ct_with(), "config_groups": {}}, "0 config_groups"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt='e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size=\[128\]"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "static"),
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, "activation_scale_ub=-1"),
])
def test_what_is_not_implemented_is_refused_naming_it(q, named):
    with pytest.raises(ValueError, match=named):
        resolve_quantization({"quantization_config": q})


def test_refusals_at_load(checkpoint_dir, tmp_path):
    fp8, _ = fp8_checkpoint(checkpoint_dir("llama"), tmp_path / "a", "ct-channel")
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer 0 has no self_attn.k_scale.*kv_cache_scheme"):  # and no scales
        LLM(str(fp8), device="cpu")
    # the config excludes a module the checkpoint stores in FP8, or quantizes one stored dense
    cfg["quantization_config"].update(kv_cache_scheme=None, ignore=["lm_head", "model.layers.0.mlp.down_proj",
                                                                  "model.layers.1.self_attn.q_proj"])
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="q_proj.weight is stored in FP8 but quantization_config excludes"):
        LLM(str(fp8), device="cpu")
    cfg["quantization_config"]["ignore"] = ["lm_head"]
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantizes 'model.layers.0.mlp.down_proj' but the checkpoint stores"):
        LLM(str(fp8), device="cpu")
    with pytest.raises(NotImplementedError, match="transformers backend"):
        LLM(str(fp8), device="cpu", model_impl="transformers")


# --- the FP8 weight ------------------------------------------------------------------------------

def _weight(n=48, k=64, seed=0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_per_channel_quantization_is_within_fp8_precision():
    w = _weight()
    q = quantize_per_channel(w)
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale.shape == (48,)
    err = (q.dequantize(torch.float32) - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert 0 < err.max() <= 2**-4  # e4m3: 3 mantissa bits, relative to each row's largest value
    assert q.nbytes == 48 * 64 + 48 * 4 and weight_bytes(q) == q.nbytes and weight_bytes(w) == 48 * 64 * 4


def test_activation_quantization_per_token_static_and_clamped():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    x[2] *= 1000
    xq, scale = quantize_activations(x, None, None)
    assert scale.shape == (5, 1) and torch.allclose(scale[:, 0], x.abs().amax(dim=1) / 448)
    assert ((xq.float() * scale - x).abs() <= x.abs().amax(dim=1, keepdim=True) * 2**-4).all()
    _, clamped = quantize_activations(x, None, 100.0)
    assert clamped[2, 0] == 100.0 / 448 and torch.equal(clamped[0], scale[0])
    _, static = quantize_activations(x, torch.tensor([0.5]), None)
    assert (static == 0.5).all()


def test_reference_linear_is_close_to_the_dequantized_linear():
    w, x = quantize_per_channel(_weight()), torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(48)
    dense = linear(x, w.dequantize(torch.float32), bias)
    out = reference_linear(x, w, bias)
    assert out.shape == (7, 48) and not torch.equal(out, dense)  # the activations were rounded too
    assert (out - dense).abs().max() <= 0.05 * dense.abs().max()


def test_fusing_fp8_weights():
    a, b = quantize_per_channel(_weight(32)), quantize_per_channel(_weight(16, seed=3))
    a.input_scale, b.input_scale = torch.tensor([0.1]), torch.tensor([0.3])
    fused = cat_rows([a, b])
    assert torch.equal(fused.dequantize(torch.float32), torch.cat([a.dequantize(torch.float32),
                                                                   b.dequantize(torch.float32)]))
    assert fused.input_scale.item() == pytest.approx(0.3)  # the larger: no part clips
    mixed = cat_rows([a, _weight(16)])  # a module excluded from quantization next to a quantized one
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (48, 64)
    blocks = Fp8Weight(a.weight, torch.ones(1, 2), (32, 32))
    ragged = Fp8Weight(b.weight, torch.ones(1, 2), (32, 32))
    with pytest.raises(ValueError, match="do not end on a"):
        cat_rows([ragged, blocks])


def test_block_scales_of_a_tensor_parallel_part():
    scale = torch.arange(12.0).reshape(3, 4)  # a [96, 128] weight in 32 x 32 blocks
    assert torch.equal(_block_part(scale, (32, 32), (96, 128), Part(0, 32, 96, 64), "m"), scale[1:])
    assert torch.equal(_block_part(scale, (32, 32), (96, 128), Part(1, 64, 128, 64), "m"), scale[:, 2:])
    with pytest.raises(ValueError, match="does not fall on its 32-wide FP8 blocks"):
        _block_part(scale, (32, 32), (96, 128), Part(0, 48, 96, 48), "m")
    with pytest.raises(ValueError, match="block scales have shape"):
        _block_part(scale, (16, 32), (96, 128), None, "m")


# --- the floor model and the bench ------------------------------------------------------------------

def test_the_floor_counts_fp8_projections_at_one_byte_plus_their_row_scales():
    from tandem.bench.roofline import FloorModel
    from tandem.bench.step_log import StepRecord
    from tandem.model.presets import preset_config
    from tandem.model.quant.linear import LinearStorage

    cfg = preset_config("random:llama3-8b")
    rec = StepRecord(0, num_tokens=32, num_seqs=32, num_decode=32, num_sampled=32, kv_tokens=32 * 1000,
                     attn_pairs=32 * 1000, t_begin=0, schedule_s=0, build_s=0, submit_s=0)
    fp8 = LinearStorage("float8_e4m3fn", 1, scale_bytes=4)
    bf16, stored = FloorModel(cfg, torch.bfloat16).step_cost(rec), FloorModel(cfg, torch.bfloat16, 1, fp8).step_cost(rec)
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336  # q/k/v, o, gate/up/down weights
    rows = (4096 + 2 * 1024) + 4096 + 2 * 14336 + 4096  # one float32 scale each
    assert bf16.bytes - stored.bytes == 32 * (per_layer * 2 - (per_layer + rows * 4))
    assert stored.flops == bf16.flops
    half = FloorModel(cfg, torch.bfloat16, 2, fp8).step_cost(rec)
    assert half.bytes < stored.bytes
    blocks = LinearStorage("float8_e4m3fn", 1, scale_bytes=4, group_size=128, block_rows=128)
    block_scales = (48 * 32 + 32 * 32 + 224 * 32 + 32 * 112) * 4  # [rows / 128, cols / 128] per matrix
    assert bf16.bytes - FloorModel(cfg, torch.bfloat16, 1, blocks).step_cost(rec).bytes == 32 * (
        per_layer - block_scales)


def test_bench_reports_the_weight_dtype_and_quantization(tmp_path, capsys):
    from tandem.cli import main

    out = tmp_path / "run.json"
    assert main(["bench", "--model", "random:tiny", "--quantization", "fp8", "--num-requests", "2", "--prompt-len",
                 "5", "--max-tokens", "3", "--modes", "async", "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    # on a CPU the FP8 weights were dequantized at load: the weights the GEMMs read are float32
    assert data["weight_dtype"] == "float32" and data["quantization"].startswith("fp8 (online: channel weights")
    assert "weights float32, quantization fp8 (online" in capsys.readouterr().out


# --- the FP8 GEMM path (torch._scaled_mm, which also runs on a CPU in bfloat16) -----------------------

@pytest.mark.parametrize("input_scale, ub", [(None, None), (None, 0.5), (torch.tensor([0.004]), None)])
def test_the_fp8_gemm_equals_its_float32_arithmetic(input_scale, ub):
    from tandem.model.quant.fp8 import fp8_linear

    w = quantize_per_channel(_weight())
    w.input_scale, w.scale_ub = input_scale, ub
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    out, ref = fp8_linear(x, w, bias), reference_linear(x, w, bias)
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


@pytest.mark.parametrize("fmt", ["ct-tensor", "ct-channel", "fbgemm"])
def test_the_engine_on_fp8_gemms(checkpoint_dir, tmp_path, monkeypatch, fmt):
    """The path CUDA >= 8.9 takes, forced on the CPU (bfloat16): projections stay FP8 through the
    model seam (fused q/k/v with their static scales, gate/up), sync == async, and the tokens are those
    of the same model computing each FP8 linear in float32 (``reference_linear``)."""
    import tandem.model.quant.reader as reader
    from tandem.model.quant.fp8 import Fp8Weight

    monkeypatch.setattr(reader, "native_fp8", lambda device, dtype: dtype == torch.bfloat16)
    fp8, _ = fp8_checkpoint(checkpoint_dir("llama"), tmp_path / fmt, fmt)
    llm = LLM(str(fp8), device="cpu", dtype="bfloat16", max_model_len=64, kv_cache_tokens=256)
    layer = llm.engine.worker.model.weights.layers[1]
    assert isinstance(layer.qkv, Fp8Weight) and isinstance(layer.down, Fp8Weight)
    assert (layer.qkv.input_scale is not None) == (fmt == "ct-tensor")
    runs = {}
    for mode in (False, True):
        llm.engine.core.set_async(mode)
        runs[mode] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    monkeypatch.setattr(Fp8Weight, "forward", lambda self, x, bias=None: reference_linear(x, self, bias))
    llm.engine.core.set_async(False)
    assert runs[False] == runs[True] == [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_fp8_checkpoint_under_tensor_parallelism(checkpoint_dir, tmp_path):
    """Two processes, each reading its rows or columns of the FP8 weights and their scales."""
    fp8, ref = fp8_checkpoint(checkpoint_dir("llama"), tmp_path / "tp", "ct-tensor")
    llm = LLM(str(fp8), device="cpu", tensor_parallel_size=2, max_model_len=64, kv_cache_tokens=256)
    try:
        out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert out == _tokens(ref)


def test_a_moe_checkpoint_on_fp8_gemms_keeps_its_experts_fp8(checkpoint_dir, tmp_path, monkeypatch, caplog):
    """Issue 25: on the native FP8 path the experts stay FP8 (with their scales); nothing is
    dequantized at load, so no warning (tests/test_fp8_experts_models.py checks their tokens)."""
    import tandem.model.quant.reader as reader
    from tandem.model.quant.fp8 import Fp8Weight
    from tandem.model.quant.fp8_experts import Fp8Experts

    monkeypatch.setattr(reader, "native_fp8", lambda device, dtype: dtype == torch.bfloat16)
    fp8, _ = fp8_checkpoint(checkpoint_dir("qwen3_moe"), tmp_path / "moe", "ct-channel")
    with caplog.at_level("WARNING", logger="tandem.model.quant.reader"):
        llm = LLM(str(fp8), device="cpu", dtype="bfloat16", max_model_len=64, kv_cache_tokens=256)
    layer = llm.engine.worker.model.weights.layers[0]
    assert isinstance(layer.qkv, Fp8Weight) and isinstance(layer.experts.w13, Fp8Experts)
    assert layer.experts.w13.weight.dtype == torch.float8_e4m3fn and "dequantized at load" not in caplog.text
    assert all(len(o.outputs[0].token_ids) == 10 for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False))
