"""FP8 experts end to end (issue 25): a tiny Qwen3-MoE checkpoint (transformers' ``save_pretrained``,
one tensor per expert) quantized to FP8 in each format loads with its experts kept FP8 on the
native path (forced on the CPU, float32) and gives the greedy tokens of the same model with the
dequantized weights in float32; tensor-parallel slices carry their scales, and a block-wise slice
that cuts a block is refused naming the layer and sizes; ``--quantization fp8`` quantizes the
experts per output channel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fp8_checkpoints import FORMATS, Fp8Format, _ct, fp8_checkpoint
from moe_cases import check_rank_slices, kernel_gives_the_dequantized_tokens
from tandem import LLM, SamplingParams
from tandem.model.quant.fp8_experts import Fp8Experts

# ct-block's 32-row blocks cut this model's 48 k/v rows, which the native path cannot fuse into q/k/v
# (a limit of the linear layers, not of the experts): its layout in 16-row blocks runs instead.
CT_BLOCK16 = Fp8Format("block", _ct({"strategy": "block", "block_structure": [16, 16]},
                                    {"strategy": "group", "group_size": 16, "dynamic": True}), block=(16, 16))
NATIVE_FORMATS = sorted(set(FORMATS) - {"ct-block"}) + ["ct-block16"]


def _fp8_block(bn: int, bk: int) -> Fp8Format:
    """transformers' fine-grained FP8 layout in [bn, bk] blocks."""
    config = dict(FORMATS["fp8-block"].config, weight_block_size=[bn, bk])
    return Fp8Format("block", config, block=(bn, bk), scale_name="weight_scale_inv")


# blocks every tensor-parallel slice of the test model falls on (attention heads of 24 rows), and
# blocks whose 24 rows an expert's 16-row half cuts
LOCAL_FORMATS = {"ct-block16": CT_BLOCK16, "fp8-block8": _fp8_block(8, 8), "fp8-block24x8": _fp8_block(24, 8)}
PROMPTS = [[5, 17, 42, 99, 3], [200, 7, 7, 64], list(range(30, 52))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _force_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path CUDA >= 8.9 takes, on the CPU in float32: experts stay FP8 (the reference reads them),
    and the FP8 linear layers multiply their dequantized weights (weight-only, exactly the
    dequantized model's arithmetic) since the CPU has no FP8 GEMM."""
    import tandem.model.quant.reader as reader
    from tandem.model.quant.fp8 import Fp8Weight

    monkeypatch.setattr(reader, "native_fp8", lambda device, dtype: True)
    for name, fmt in LOCAL_FORMATS.items():
        monkeypatch.setitem(FORMATS, name, fmt)
    monkeypatch.setattr(Fp8Weight, "forward", lambda self, x, bias=None: F.linear(x, self.dequantize(x.dtype), bias))


def _tokens(path: Path | str, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256, **kwargs)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("fmt", NATIVE_FORMATS)
def test_fp8_experts_give_the_dequantized_models_tokens(checkpoint_dir, tmp_path, monkeypatch, fmt):
    _force_native(monkeypatch)
    fp8, ref = fp8_checkpoint(checkpoint_dir("qwen3_moe"), tmp_path / fmt, fmt)
    llm = LLM(str(fp8), device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256)
    experts = llm.engine.worker.model.weights.layers[0].experts
    assert isinstance(experts.w13, Fp8Experts) and isinstance(experts.w2, Fp8Experts)
    assert experts.w13.weight.dtype == torch.float8_e4m3fn and experts.w13.shape == (8, 64, llm_hidden(llm))
    assert experts.w13.block == (FORMATS[fmt].block or (1, llm_hidden(llm)))
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm.engine.shutdown()
    assert got == _tokens(ref)


def llm_hidden(llm: LLM) -> int:
    return llm.engine.worker.model.config.hidden_size


# the FP8 path forced on the CPU, as _force_native does
SETUP = """
import tandem.model.quant.reader as reader
from tandem.model.quant.fp8 import Fp8Weight
from tandem.model.quant.fp8_experts import Fp8Experts

reader.native_fp8 = lambda device, dtype: True
Fp8Weight.forward = lambda self, x, bias=None: F.linear(x, self.dequantize(x.dtype), bias)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (the test extra)")
def test_the_kernel_on_a_block_fp8_checkpoint_gives_the_dequantized_models_tokens(checkpoint_dir, tmp_path):
    """The fused kernel (interpreted) reading the FP8 experts vs the float32 dequantized model."""
    fp8, ref = fp8_checkpoint(checkpoint_dir("qwen3_moe"), tmp_path / "block", "fp8-block")
    kernel_gives_the_dequantized_tokens(SETUP, "Fp8Experts", fp8, ref)


def test_online_fp8_quantizes_the_experts_per_channel(monkeypatch):
    _force_native(monkeypatch)
    llm = LLM("random:tiny-qwen3-moe", device="cpu", dtype="float32", quantization="fp8", max_model_len=64,
              kv_cache_tokens=256)
    layer = llm.engine.worker.model.weights.layers[0]
    w13 = layer.experts.w13
    assert isinstance(w13, Fp8Experts) and w13.block == (1, 64) and w13.shape == (8, 64, 64)
    assert all(len(o.outputs[0].token_ids) == 8 for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    llm.engine.shutdown()
    monkeypatch.undo()  # the same weights unquantized: within e4m3's rounding of each element
    dense = LLM("random:tiny-qwen3-moe", device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256)
    want = dense.engine.worker.model.weights.layers[0].experts.w13
    dense.engine.shutdown()
    err = (w13.dequantize(torch.float32) - want).abs()
    assert (err <= want.abs() / 16 + w13.scale.repeat_interleave(64, 2) * 2 ** -9).all()
    assert err.max() > 0  # quantized: not the dense weights themselves


@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("fmt", ["fp8-block8", "ct-channel", "ct-tensor"])
def test_each_ranks_fp8_experts_are_its_slice_of_the_whole(checkpoint_dir, tmp_path, monkeypatch, fmt,
                                                          expert_parallel):
    """Rank r of 2 (tensor or expert parallel) loads FP8 experts that dequantize to its experts, or
    its slice of every expert's width, of the unsharded model's: scales sliced with the weights."""
    from tandem.model.loader import load_model
    from tandem.model.tp_layout import TPLayout

    _force_native(monkeypatch)
    fp8, _ = fp8_checkpoint(checkpoint_dir("qwen3_moe"), tmp_path / fmt, fmt)

    def experts(tp: TPLayout) -> tuple[torch.Tensor, torch.Tensor]:
        w = load_model(str(fp8), torch.device("cpu"), torch.float32, 64, tp=tp).weights.layers[2].experts
        assert isinstance(w.w13, Fp8Experts) and isinstance(w.w2, Fp8Experts)
        return w.w13.dequantize(torch.float32), w.w2.dequantize(torch.float32)

    check_rank_slices(experts, expert_parallel)


def test_a_tensor_parallel_split_that_cuts_fp8_expert_blocks_is_refused_at_load(checkpoint_dir, tmp_path,
                                                                                monkeypatch):
    from tandem.model.loader import load_model
    from tandem.model.tp_layout import TPLayout

    _force_native(monkeypatch)
    fp8, _ = fp8_checkpoint(checkpoint_dir("qwen3_moe"), tmp_path / "ct", "fp8-block24x8")  # expert I = 32
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts.0.gate_proj: tensor-parallel part \[0, 16\) of "
                                         r"dimension 0 of its \[32, \d+\] weight does not fall on its 24-wide FP8"):
        load_model(str(fp8), torch.device("cpu"), torch.float32, 64, tp=TPLayout(0, 2))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_the_floor_counts_fp8_expert_bytes_and_scales(tp_size):
    """An FP8 model's experts count at one byte a weight plus their float32 scales (per row, or per
    block), not at the model dtype's size (4-bit experts: tests/test_int4_experts_loading.py)."""
    from tandem.bench.roofline import FloorModel
    from tandem.model.sources import resolve_model_config
    from tandem.model.moe_shape import moe_shape
    from tandem.model.quant.linear import LinearStorage

    cfg = resolve_model_config("random:tiny-qwen3-moe")
    s = moe_shape(cfg)
    h, i, layers = s.hidden_size, s.expert_intermediate, len(s.sparse_layers)
    channel = LinearStorage("float8_e4m3fn", 1, scale_bytes=4, matrix_bytes=4)  # a static scale: not on experts
    block = LinearStorage("float8_e4m3fn", 1, scale_bytes=4, group_size=16, block_rows=16)
    rows = 2 * i + h  # gate, up and down rows of one expert
    for storage, scales in ((channel, rows), (block, (2 * i // 16) * (h // 16) + (h // 16) * (i // 16))):
        floor = FloorModel(cfg, torch.bfloat16, tp_size, storage)
        assert floor.expert_bytes == pytest.approx(layers * (3 * h * i + 4 * scales) / tp_size)
    dense = FloorModel(cfg, torch.bfloat16, tp_size)
    assert dense.expert_bytes == pytest.approx(layers * 3 * h * i * 2 / tp_size)
    step = _decode_step(1)
    fp8 = FloorModel(cfg, torch.bfloat16, tp_size, channel)
    saved = dense.step_cost(step).bytes - fp8.step_cost(step).bytes - (dense.layer_bytes - fp8.layer_bytes)
    assert saved == pytest.approx(s.top_k * (dense.expert_bytes - fp8.expert_bytes))


def _decode_step(tokens: int):
    """A record of one decode step of ``tokens`` rows."""
    from tandem.bench.step_log import StepRecord

    return StepRecord(0, num_tokens=tokens, num_seqs=tokens, num_decode=tokens, num_sampled=tokens,
                      kv_tokens=tokens, attn_pairs=tokens, t_begin=0, schedule_s=0, build_s=0, submit_s=0)
