"""CheckpointReader opens each safetensors file once while a model loads (opening parses the whole
header, so opening per tensor made loading quadratic in a shard's tensors), and closes them after."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

import tandem.model.loader as loader
from tandem.model.loader import CheckpointReader, load_model


def _counting_opens(monkeypatch) -> Counter:
    opened: Counter = Counter()
    real = loader._open

    def counted(file: Path):
        opened[file.name] += 1
        return real(file)

    monkeypatch.setattr(loader, "_open", counted)
    return opened


def test_loading_opens_each_shard_once_and_gives_the_same_model(sharded_checkpoint, monkeypatch):
    before = load_model(str(sharded_checkpoint), torch.device("cpu"), torch.float32, 64)
    opened = _counting_opens(monkeypatch)
    model = load_model(str(sharded_checkpoint), torch.device("cpu"), torch.float32, 64)
    shards = sorted(p.name for p in sharded_checkpoint.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(opened) == shards and set(opened.values()) == {1}
    ours, theirs = _tensors(model.weights), _tensors(before.weights)
    assert len(ours) > 10 and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor under the model's weights (dataclasses, lists), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for name in obj.__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    return []


def test_a_closed_reader_reopens_on_the_next_read(sharded_checkpoint, monkeypatch):
    reader = CheckpointReader(sharded_checkpoint, torch.device("cpu"), torch.float32)
    name = next(iter(reader.files))
    first = reader.raw(name, None)
    reader.close()
    opened = _counting_opens(monkeypatch)
    assert torch.equal(reader.raw(name, None), first) and sum(opened.values()) == 1
    reader.raw(name, None)
    assert sum(opened.values()) == 1  # still open
    reader.close()
