"""Tensor-parallel shards without processes: each rank's weights, read from safetensors slices or drawn
from the seeded presets, are exactly its part of the single-device weights, and together they cover
the model once (KV heads replicated where there are fewer than ranks). Plus the presets' shapes."""
import dataclasses

import pytest
import torch

from checkpoints import ARCHS

from tandem.model.loader import CheckpointReader, random_getter
from tandem.model.models.llama import ModelWeights, load_weights
from tandem.model.model_config import ModelConfig
from tandem.model.presets import PRESETS
from tandem.model.registry import ARCHITECTURES
from tandem.model.sources import resolve_model_config
from tandem.model.tp_layout import TPLayout
from tandem.parallel.env import check_world_matches


def test_presets_have_the_published_parameter_counts():
    """Llama-3-70B: 70,553,706,496 parameters (141.1 GB in bf16); Qwen3-32B: 32.8B, 31.2B without
    embeddings (its model card); Llama-3-8B: 8,030,261,248."""
    assert PRESETS["llama3-70b"].num_params() == 70_553_706_496
    assert PRESETS["llama3-8b"].num_params() == 8_030_261_248
    qwen = PRESETS["qwen3-32b"]
    assert round(qwen.num_params() / 1e9, 1) == 32.8
    assert round((qwen.num_params() - 2 * qwen.vocab_size * qwen.hidden_size) / 1e9, 1) == 31.2
    assert qwen.qk_norm and not qwen.tie_word_embeddings and qwen.head_dim * qwen.num_heads != qwen.hidden_size


@pytest.mark.parametrize("size", [3, 5])
def test_a_model_that_does_not_split_is_refused(size):
    with pytest.raises(ValueError, match=f"tensor_parallel_size={size}"):
        TPLayout(0, size).check(PRESETS["tiny"])


def test_torchrun_world_must_be_the_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_matches(2)
    with pytest.raises(ValueError, match="--tensor-parallel-size 2"):
        check_world_matches(1)


def _qkv(cfg: ModelConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size])


def _heads(t: torch.Tensor, head_dim: int) -> list[torch.Tensor]:
    return list(t.split(head_dim))


def _check_qkv(cfg: ModelConfig, local: list[ModelConfig], full: torch.Tensor, shards: list[torch.Tensor]) -> None:
    """q rows partition; each rank's K and V rows are the KV heads its query heads read (weights or biases)."""
    fq, fk, fv = _qkv(cfg, full)
    parts = [_qkv(c, s) for c, s in zip(local, shards)]
    assert torch.equal(torch.cat([q for q, _, _ in parts]), fq)
    group = cfg.num_heads // cfg.num_kv_heads
    for r, (c, (_, k, v)) in enumerate(zip(local, parts)):
        for j in range(c.num_heads):  # local query head j of rank r is global head r * Hq' + j
            kv_global, kv_local = (r * c.num_heads + j) // group, j // (c.num_heads // c.num_kv_heads)
            assert torch.equal(_heads(k, cfg.head_dim)[kv_local], _heads(fk, cfg.head_dim)[kv_global])
            assert torch.equal(_heads(v, cfg.head_dim)[kv_local], _heads(fv, cfg.head_dim)[kv_global])


def check_shards(cfg: ModelConfig, full: ModelWeights, shards: list[ModelWeights]) -> None:
    """Query heads, MLP rows and vocabulary rows partition the model; each rank's KV heads are the
    ones its query heads read; norms are replicated."""
    n = len(shards)
    local = [TPLayout(r, n).local_config(cfg) for r in range(n)]
    for i, layer in enumerate(full.layers):
        _check_qkv(cfg, local, layer.qkv, [s.layers[i].qkv for s in shards])
        if layer.qkv_bias is not None:
            _check_qkv(cfg, local, layer.qkv_bias, [s.layers[i].qkv_bias for s in shards])
        assert torch.equal(torch.cat([s.layers[i].o for s in shards], dim=1), layer.o)
        assert torch.equal(torch.cat([s.layers[i].down for s in shards], dim=1), layer.down)
        gate_up = [s.layers[i].gate_up.chunk(2) for s in shards]
        assert torch.equal(torch.cat([g for g, _ in gate_up] + [u for _, u in gate_up]), layer.gate_up)
        for name in ("input_norm", "post_norm", "q_norm", "k_norm"):
            assert all(torch.equal(getattr(s.layers[i], name), getattr(layer, name)) for s in shards
                       if getattr(layer, name) is not None)
    for name in ("embed", "lm_head"):
        rows = torch.cat([getattr(s, name) for s in shards])
        assert torch.equal(rows[:cfg.vocab_size], getattr(full, name))
        assert not rows[cfg.vocab_size:].any()  # the last shard's padding


def _valid_sizes(cfg: ModelConfig) -> list[int]:
    sizes = []
    for n in (2, 4):
        try:
            TPLayout(0, n).check(cfg)
            sizes.append(n)
        except ValueError:
            pass
    return sizes


LLAMA_FAMILY = [a for a in ARCHS if getattr(ARCHITECTURES.get(ARCHS[a]["model_cls"]), "module", None) == "llama"]


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_checkpoint_shards_are_slices_of_the_whole(checkpoint_dir, arch):
    path = checkpoint_dir(arch)
    cfg = resolve_model_config(str(path))
    read = lambda tp: load_weights(cfg, CheckpointReader(path, torch.device("cpu"), torch.float32).get, tp)  # noqa: E731
    full = read(TPLayout())
    sizes = _valid_sizes(cfg)
    assert 2 in sizes
    for n in sizes:
        check_shards(cfg, full, [read(TPLayout(r, n)) for r in range(n)])


def test_random_shards_are_slices_of_the_single_device_weights():
    """Vocabulary 450 over 4 ranks: shards of 113 rows, the last one padded with two zero rows."""
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=450, num_kv_heads=1, qk_norm=True, qkv_bias=True)
    draw = lambda tp: load_weights(cfg, random_getter(torch.device("cpu"), torch.float32, 7), tp)  # noqa: E731
    full = draw(TPLayout())
    for n in (2, 4):
        check_shards(cfg, full, [draw(TPLayout(r, n)) for r in range(n)])
    assert TPLayout(3, 4).vocab_part(cfg).size == 113 and TPLayout(3, 4).vocab_part(cfg).stop == 450


def test_the_roofline_floor_of_a_tp_group_is_one_gpus():
    """Llama-3-70B decode: its 141 GB of bf16 weights less the embedding table (only looked-up rows are
    read) is 139 GB per step, over two GPUs 69.5 GB each; KV heads are split (8 over 2) until there are
    fewer than ranks (8 over 16: one each, replicated)."""
    from tandem.bench.roofline import FloorModel
    from tandem.bench.step_log import StepRecord

    cfg, kv = PRESETS["llama3-70b"], 32 * 1000
    rec = StepRecord(0, num_tokens=32, num_seqs=32, num_decode=32, num_sampled=32, kv_tokens=kv, attn_pairs=kv,
                     t_begin=0.0, schedule_s=0.0, build_s=0.0, submit_s=0.0)
    floors = {n: FloorModel(cfg, torch.bfloat16, n) for n in (1, 2, 16)}
    one, two = floors[1].step_cost(rec), floors[2].step_cost(rec)
    assert 138.9e9 < one.bytes - (kv + 32) * floors[1].kv_token_bytes < 139.1e9
    assert two.bytes == pytest.approx(one.bytes / 2) and two.flops == pytest.approx(one.flops / 2)
    assert floors[16].kv_token_bytes == floors[1].kv_token_bytes // 8


def test_a_step_header_carries_every_shape_and_sampler_field():
    import numpy as np

    from tandem.contract.step import SamplerFlags, StepInputs, StepShape
    from tandem.parallel.control import Kind, Message

    step = StepInputs(41, StepShape(7, 3, 2, 5, 9), SamplerFlags(True, False), np.arange(13))
    received = Message.decode(Message.step(step).encode())
    assert (received.kind, received.step_id, received.shape, received.sampler) == (Kind.STEP, 41, step.shape,
                                                                                    step.sampler)
    assert received.step_inputs().data.shape == (13,)
    assert Message.decode(Message(Kind.SET_ASYNC, num_words=1).encode()).num_words == 1


def test_a_rank_reads_only_slices_of_the_split_tensors(checkpoint_dir, monkeypatch):
    """Whole tensors are read only where every rank holds all of them (norms): the rest come from
    safetensors slices, so no rank ever holds another rank's part, even in host memory."""
    from tandem.model import loader

    whole: list[str] = []
    real_open = loader._open

    class Recording:
        def __init__(self, file):
            self.f = real_open(file)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            whole.append(name)
            return self.inner.get_tensor(name)

        def get_slice(self, name):
            return self.inner.get_slice(name)

    path = checkpoint_dir("qwen2")
    reader = CheckpointReader(path, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(loader, "_open", Recording)
    load_weights(resolve_model_config(str(path)), reader.get, TPLayout(1, 2))
    assert whole and all("norm" in name for name in whole)
