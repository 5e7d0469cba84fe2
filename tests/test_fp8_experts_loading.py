"""FP8 experts as the loader reads them (issue 25): ``QuantizedGetter.expert`` keeps one expert's FP8
projection with its scales, each tensor-parallel slice (rows of gate/up, columns of down, an empty
part for an expert another rank holds) with the scales of its rows or blocks, and refuses a
block-wise slice that cuts a block, naming the layer and the sizes."""
from __future__ import annotations

import pytest
import torch

from fp8_checkpoints import FORMATS
from tandem.model.quant.fp8_experts import Fp8Experts
from tandem.model.tp_layout import Part


class _Reader:
    """A ``RawReader`` over in-memory tensors, slicing a part as the checkpoint reader does."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def stored_dtype(self, name: str) -> str:
        return "F8_E4M3" if self.tensors[name].dtype == torch.float8_e4m3fn else "F32"

    def raw(self, name: str, shape, part: Part | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if part is None else t.narrow(part.dim, part.start, part.stop - part.start)


def _getter(fmt: str, w: torch.Tensor, scale: torch.Tensor, monkeypatch):
    import tandem.model.quant.reader as reader
    from tandem.model.quant.config import parse_quantization_config

    monkeypatch.setattr(reader, "native_fp8", lambda device, dtype: True)
    name = "model.layers.2.mlp.experts.5.gate_proj"
    raw = _Reader({f"{name}.weight": w, f"{name}.{FORMATS[fmt].scale_name}": scale,
                   f"{name}.input_scale": torch.tensor([0.02])})  # read where activations are static
    qc = parse_quantization_config(FORMATS[fmt].config)
    return reader.QuantizedGetter(lambda *a: None, qc, torch.device("cpu"), torch.float32, raw), f"{name}.weight"


@pytest.mark.parametrize("fmt", ["ct-channel", "ct-block", "ct-tensor"])
def test_tensor_parallel_slices_carry_their_scales(fmt, monkeypatch):
    """Each rank's rows (gate/up) or columns (down) of an FP8 expert dequantize to that slice of the
    whole weight: the scales are sliced with it."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 96, generator=g).to(torch.float8_e4m3fn)
    scale = {"ct-channel": torch.rand(64, 1, generator=g), "ct-block": torch.rand(2, 3, generator=g),
             "ct-tensor": torch.rand(1, generator=g)}[fmt]
    get, name = _getter(fmt, w, scale, monkeypatch)
    whole = get.expert(name, (64, 96), None)
    assert isinstance(whole, Fp8Experts) and whole.shape == (1, 64, 96)
    full = whole.expert(0, torch.float32)
    for part in (Part(0, 32, 64, 32), Part(1, 0, 32, 32), Part(1, 64, 96, 32)):
        piece = get.expert(name, (64, 96), part)
        assert torch.equal(piece.expert(0, torch.float32), full.narrow(part.dim, part.start, 32)), part
    for empty in (Part(0, 0, 0, 0), Part(1, 0, 0, 0)):  # an expert another rank holds: read, not kept
        assert get.expert(name, (64, 96), empty).shape == ((1, 64, 0) if empty.dim else (1, 0, 96))


def test_a_block_slice_that_cuts_a_block_is_refused(monkeypatch):
    from tandem.model.quant.reader import _block_part

    scale = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts.5.gate_proj: tensor-parallel part \[16, 32\) "
                                         r"of dimension 0 of its \[64, 96\] weight does not fall on its 32-wide"):
        _block_part(scale, (32, 32), (64, 96), Part(0, 16, 32, 16), "model.layers.2.mlp.experts.5.gate_proj")
    assert _block_part(scale, (32, 32), (64, 96), Part(1, 32, 96, 64), "x").shape == (2, 2)
    get, name = _getter("ct-block", torch.zeros(64, 96).to(torch.float8_e4m3fn), scale, monkeypatch)
    with pytest.raises(ValueError, match="experts.5.gate_proj.*does not fall on its 32-wide FP8 blocks"):
        get.expert(name, (64, 96), Part(0, 48, 64, 16))  # what a 4-way split of 64 rows would read
