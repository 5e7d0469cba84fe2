"""4-bit experts end to end: tiny Qwen3-MoE and Mixtral checkpoints (transformers' ``save_pretrained``,
one tensor per expert) quantized here to AWQ, GPTQ and compressed-tensors pack-quantized
(tests/test_int4_models.py's packers), and ``quantization="int4"`` on the random presets, load with
their experts kept 4-bit (``Int4Experts``) where the linears stay 4-bit (the W4A16 path, forced on the
CPU in float32) and give the greedy tokens of the same model with the dequantized weights in float32
(the reference reads each expert dequantized; the fused kernel, interpreted, reads the packed
tiles); act-order experts are dequantized at load; tensor/expert-parallel ranks hold their slices of
the whole model's experts, and a slice that cuts a group is refused naming the layer; the floor
counts the 4-bit bytes."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from moe_cases import check_rank_slices, kernel_gives_the_dequantized_tokens
from tandem import LLM, SamplingParams
from tandem.model.quant.int4_experts import Int4Experts
from test_int4_models import LINEARS, quantized_pair

MOE_LINEARS = LINEARS + ("w1", "w2", "w3")  # Mixtral's experts
PROMPTS = [[5, 17, 42, 99, 3], [200, 7, 7, 64], list(range(30, 52))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SETTINGS = dict(device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256)


def _force_kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path CUDA takes, on the CPU in float32: linears and experts stay 4-bit, the experts read by
    the reference (one expert dequantized at a time), the linears multiplying their dequantized weights
    (weight-only: exactly the dequantized model's arithmetic; tests/test_int4_models.py runs their kernel)."""
    import tandem.model.quant.int4_linear as int4_linear

    monkeypatch.setattr(int4_linear, "use_kernel", lambda device: True)
    monkeypatch.setattr(int4_linear.Int4Linear, "forward",
                        lambda self, x, bias=None: F.linear(x, self.dequantize(x.dtype), bias))


def _tokens(llm: LLM) -> list[list[int]]:
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


def _experts(llm: LLM, layer: int = 0):
    return llm.engine.worker.model.weights.layers[layer].experts


@pytest.mark.parametrize("arch,fmt", [("qwen3_moe", "awq"), ("qwen3_moe", "gptq"), ("qwen3_moe", "ct-sym"),
                                      ("qwen3_moe", "ct-asym"), ("mixtral", "awq"), ("mixtral", "ct-sym")])
def test_int4_experts_give_the_dequantized_models_tokens(checkpoint_dir, tmp_path, monkeypatch, arch, fmt):
    _force_kernel_path(monkeypatch)
    quant, dense = quantized_pair(checkpoint_dir(arch), tmp_path, fmt, MOE_LINEARS)
    llm = LLM(str(quant), **SETTINGS)
    w = _experts(llm)
    assert isinstance(w.w13, Int4Experts) and isinstance(w.w2, Int4Experts) and w.w13.group_size == 32
    assert (w.w13.zeros is None) == (fmt == "ct-sym")  # symmetric: no zero points stored
    got, want = _tokens(llm), _tokens(LLM(str(dense), **SETTINGS))
    assert got == want and len({t for seq in want for t in seq}) > 3


def test_act_order_experts_are_dequantized_at_load(checkpoint_dir, tmp_path, monkeypatch, caplog):
    _force_kernel_path(monkeypatch)
    quant, dense = quantized_pair(checkpoint_dir("qwen3_moe"), tmp_path, "gptq-act-order", MOE_LINEARS)
    llm = LLM(str(quant), **SETTINGS)
    # w2's 32 input channels are one group, so its order is trivial and it stays 4-bit
    assert isinstance(_experts(llm).w13, torch.Tensor) and isinstance(_experts(llm).w2, Int4Experts)
    assert "act-order expert): dequantized at load" in caplog.text
    assert _tokens(llm) == _tokens(LLM(str(dense), **SETTINGS))


@pytest.mark.parametrize("preset", ["random:tiny-qwen3-moe", "random:tiny-mixtral"])
def test_int4_at_load_quantizes_the_experts(monkeypatch, preset):
    """``quantization="int4"``: experts round to nearest, symmetric, per group of 128 where the width
    allows (else per output channel, as the linears), the tokens those of the same model holding
    the dequantized experts, and not the unquantized model's."""
    _force_kernel_path(monkeypatch)
    llm = LLM(preset, quantization="int4", **SETTINGS)
    layers = [layer.experts for layer in llm.engine.worker.model.weights.layers if layer.experts is not None]
    assert all(isinstance(w.w13, Int4Experts) and w.w13.zeros is None for w in layers)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    for w in layers:  # the same model, its experts dequantized
        w.w13, w.w2 = w.w13.dequantize(torch.float32), w.w2.dequantize(torch.float32)
    assert _tokens(llm) == got
    monkeypatch.undo()
    unquantized = LLM(preset, **SETTINGS)
    w13 = _experts(unquantized).w13
    assert got != _tokens(unquantized)
    from tandem.model.quant import int4

    assert torch.equal(layers[0].w13[3], int4.dequantize(int4.quantize_rtn(w13[3], -1)))


# the W4A16 path forced on the CPU, as _force_kernel_path does
SETUP = """
import tandem.model.quant.int4_linear as int4_linear
from tandem.model.quant.int4_experts import Int4Experts

int4_linear.use_kernel = lambda device: True
int4_linear.Int4Linear.forward = lambda self, x, bias=None: F.linear(x, self.dequantize(x.dtype), bias)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_the_kernel_on_an_awq_checkpoint_gives_the_dequantized_models_tokens(checkpoint_dir, tmp_path):
    """The fused kernel (interpreted) reading the packed experts vs the float32 dequantized model."""
    quant, dense = quantized_pair(checkpoint_dir("mixtral"), tmp_path, "awq", MOE_LINEARS)
    kernel_gives_the_dequantized_tokens(SETUP, "Int4Experts", quant, dense)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_each_ranks_int4_experts_are_its_slice_of_the_whole(checkpoint_dir, tmp_path, monkeypatch, expert_parallel):
    """Rank r of 2 (tensor or expert parallel) loads 4-bit experts that dequantize to its experts, or
    its slice of every expert's width (words, scales and zero points sliced together), of the
    unsharded model's. Mixtral's expert width 64 splits into two whole 32-channel groups."""
    from tandem.model.loader import load_model
    from tandem.model.tp_layout import TPLayout

    _force_kernel_path(monkeypatch)
    quant, _ = quantized_pair(checkpoint_dir("mixtral"), tmp_path, "gptq", MOE_LINEARS)

    def experts(tp: TPLayout) -> tuple[torch.Tensor, torch.Tensor]:
        w = load_model(str(quant), torch.device("cpu"), torch.float32, 64, tp=tp).weights.layers[1].experts
        assert isinstance(w.w13, Int4Experts) and isinstance(w.w2, Int4Experts) and w.w2.zeros is not None
        return w.w13.dequantize(torch.float32), w.w2.dequantize(torch.float32)

    check_rank_slices(experts, expert_parallel)


class _Reader:
    """``loader.CheckpointReader``'s ``files`` and ``raw`` over in-memory tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.files = tensors, dict.fromkeys(tensors, "model.safetensors")

    def raw(self, name: str, shape, part=None) -> torch.Tensor:
        return self.tensors[name]


def test_a_slice_that_cuts_a_group_is_refused_naming_the_layer(monkeypatch):
    """A down projection's tensor-parallel part of input channels must fall on its groups: a
    4-way split of a 64-wide expert (16 channels) cuts its 32-channel groups; a 2-way split does not."""
    from test_int4_models import _formats, _quantize

    from tandem.model.quant.config import resolve_quantization
    from tandem.model.quant.int4_linear import Int4Getter
    from tandem.model.tp_layout import Part

    _force_kernel_path(monkeypatch)
    config, opts, pack = _formats()["awq"]
    drawn = _quantize(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)), seed=1, min_zero=1, **opts)
    name = "model.layers.2.mlp.experts.5.down_proj"
    reader = _Reader({f"{name}.{k}": v for k, v in pack(drawn).items()})
    get = Int4Getter(lambda *a: None, resolve_quantization({"quantization_config": config}), torch.device("cpu"),
                     torch.float32, reader)
    half = get.expert(f"{name}.weight", (48, 64), Part(1, 32, 64, 32))
    assert isinstance(half, Int4Experts) and torch.equal(half.expert(0, torch.float32), drawn.weight()[:, 32:])
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts.5.down_proj: tensor-parallel input channels "
                                         r"\[16, 32\) do not fall on its 32-channel groups"):
        get.expert(f"{name}.weight", (48, 64), Part(1, 16, 32, 16))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_the_floor_counts_int4_expert_bytes(monkeypatch, tp_size):
    """Where the linears are 4-bit the floor counts each expert at half a byte a weight plus a scale
    per row and group (and a zero point byte unless symmetric): what the loaded Int4Experts hold."""
    from tandem.bench.roofline import FloorModel
    from tandem.model.quant.int4_config import ONLINE_INT4
    from tandem.model.quant.int4_linear import int4_storage
    from tandem.model.sources import resolve_model_config

    _force_kernel_path(monkeypatch)
    cfg = resolve_model_config("random:tiny-qwen3-moe")
    storage = int4_storage(ONLINE_INT4, torch.device("cpu"), torch.float32)
    floor, dense = FloorModel(cfg, torch.float32, tp_size, storage), FloorModel(cfg, torch.float32, tp_size)
    llm = LLM("random:tiny-qwen3-moe", quantization="int4", **SETTINGS)
    layers = [layer.experts for layer in llm.engine.worker.model.weights.layers if layer.experts is not None]
    llm.engine.shutdown()
    stored = sum(w.w13.nbytes + w.w2.nbytes for w in layers) / layers[0].w13.shape[0]  # one expert, all layers
    # two sparse layers of w13 [64, 64] and w2 [64, 32]: half a byte a weight, a float32 scale a row
    assert floor.expert_bytes == pytest.approx(stored / tp_size) == 2 * (64 * 96 / 2 + 128 * 4) / tp_size
    assert dense.expert_bytes == pytest.approx(2 * 64 * 96 * 4 / tp_size)
    asym = FloorModel(cfg, torch.float32, tp_size, int4_storage(_asymmetric(), torch.device("cpu"), torch.float32))
    assert asym.expert_bytes == pytest.approx(floor.expert_bytes + (2 * 32 + 64) * 2 / tp_size)  # a byte a group


def _asymmetric():
    import dataclasses

    from tandem.model.quant.int4_config import ONLINE_INT4

    return dataclasses.replace(ONLINE_INT4, symmetric=False)
