"""The transformers backend (``--model-impl``): transformers' modeling code on tandem's paged attention.

Greedy parity with transformers' ``generate`` (with chunked prefill and preemption) and prefill logits
for the backend's architectures (phi3, olmo2, granite, stablelm, cohere2 with per-layer windows) run in
``test_hf_parity.py`` over ``checkpoints.ARCHS``; here: that they do take the backend, async == sync
and prefix caching on == off through it, Llama through it == native Llama, presets through it, and
what it refuses at load."""
import json
import shutil

import pytest
import torch
import transformers

from checkpoints import VOCAB_SIZE, hf_greedy, hf_prefill_logits
from differential import Case, compare, make_case, run_case, run_case_with_stats, with_shared_prefixes
from gpu_parity import relative_error

from tandem import LLM, SamplingParams
from tandem.model.loader import load_model
from tandem.model.registry import implementation

BACKEND_ARCHS = ("phi3", "olmo2", "granite", "stablelm", "cohere2")
# tight enough that every case chunks its prefills and preempts
TIGHT = dict(kv_cache_tokens=96, block_size=8, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=96)


def _model(llm: LLM):
    return llm.engine.core.worker.model


def _copy_with(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_which_implementation_runs_an_architecture():
    assert implementation("Phi3ForCausalLM").module == "transformers_backend"
    assert implementation("LlamaForCausalLM").module == "llama"
    assert implementation("LlamaForCausalLM", "transformers").module == "transformers_backend"
    with pytest.raises(ValueError, match=r"unsupported architecture 'Phi3ForCausalLM'.*--model-impl transformers"):
        implementation("Phi3ForCausalLM", "tandem")


def _fit_vocab(case: Case, vocab: int) -> Case:
    """The differential's token ids (drawn for the presets' larger vocabulary) folded into ``vocab``."""
    for r in case.requests:
        r.prompt = [t % vocab for t in r.prompt]
        r.params.stop_token_ids = sorted({t % vocab for t in r.params.stop_token_ids or ()})
        r.params.logit_bias = {t % vocab: b for t, b in (r.params.logit_bias or {}).items()} or None
    return case


@pytest.mark.parametrize("arch", BACKEND_ARCHS)
def test_async_and_prefix_caching_through_the_backend(checkpoint_dir, arch):
    """Randomized cases with shared prefixes (the differential tests' generator), under a tiny KV cache
    and token budget: caching off (sync) == caching on (sync) == caching on (async)."""
    case = make_case(0, model=str(checkpoint_dir(arch)))  # eight requests
    case.engine.update(TIGHT)
    case = _fit_vocab(with_shared_prefixes(case), VOCAB_SIZE)
    off = run_case(case, async_batching=False, prefix_caching=False)
    on, _ = run_case_with_stats(case, async_batching=False, prefix_caching=True)
    on_async, stats = run_case_with_stats(case, async_batching=True, prefix_caching=True)
    problems = compare(case, off, on, names=("off", "on"), aborts_may_differ=True) + compare(case, on, on_async)
    assert not problems, case.describe() + "\n" + "\n".join(problems)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_architectures_without_a_native_family_take_the_backend(checkpoint_dir):
    llm = LLM(str(checkpoint_dir("cohere2")), device="cpu", dtype="float32")
    model = _model(llm)
    assert type(model).__name__ == "TransformersModel"
    # per-layer windows and the scale come from what each layer passes to the attention function
    assert model.kv_spec.sliding_windows == (8, None, 8)
    assert model.kv_spec.layers[0].scale == pytest.approx(16 ** -0.5)
    with pytest.raises(ValueError, match="unsupported architecture.*model_impl='tandem'"):
        LLM(str(checkpoint_dir("cohere2")), device="cpu", model_impl="tandem")


def test_llama_through_the_backend_equals_native_llama(checkpoint_dir):
    path = str(checkpoint_dir("llama"))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (5, 17, 40, 3)]
    params = SamplingParams(temperature=0, max_tokens=20)
    outs = {}
    for impl in ("tandem", "transformers"):
        llm = LLM(path, device="cpu", dtype="float32", model_impl=impl, **TIGHT)
        assert type(_model(llm)).__name__ == ("LlamaModel" if impl == "tandem" else "TransformersModel")
        outs[impl] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["tandem"] == outs["transformers"]
    ids = prompts[2]
    model = load_model(path, torch.device("cpu"), torch.float32, 64, model_impl="transformers")
    assert relative_error(_prefill(model, ids), hf_prefill_logits(path, ids)) < 1e-5


def test_gemma2_through_the_backend_matches_transformers(checkpoint_dir):
    """A native family forced through the backend: attention and final soft-caps, per-layer windows,
    query_pre_attn_scalar, with chunked prefill and preemption."""
    path = checkpoint_dir("gemma2")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (5, 17, 40, 3)]
    llm = LLM(str(path), device="cpu", dtype="float32", model_impl="transformers", **TIGHT)
    assert [spec.logit_softcap for spec in _model(llm).kv_spec.layers] == [20.0] * 3
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(path, p, 20) for p in prompts]
    assert llm.engine.core.scheduler.num_preemptions > 0


def _prefill(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    from tandem.model.attention import AttentionInputs, step_attention
    from tandem.worker.kv_cache import allocate_kv_cache

    n, blocks, device = len(ids), -(-len(ids) // block_size), model.device
    cache = allocate_kv_cache(model.kv_spec, blocks + 1, block_size, device, model.dtype)
    pos = torch.arange(n, device=device)
    tables = torch.arange(1, blocks + 1, device=device)[None]
    inputs = AttentionInputs(slot_mapping=pos + block_size, block_tables=tables, positions=pos, max_q=n,
                             query_start=torch.tensor([0, n], device=device), seq_lens=torch.tensor([n], device=device),
                             block_size=block_size)
    hidden = model.forward(torch.tensor(ids, device=device), pos, cache, step_attention(inputs))
    return model.compute_logits(hidden).float().cpu()


def test_a_preset_runs_through_the_backend():
    """A preset has no config.json: the transformers config is written from its fields, and the seeded
    weights, drawn by the same tensor names, are the native model's."""
    prompts = [[5, 9, 200, 31, 7], [300, 2, 2, 8]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {impl: [o.outputs[0].token_ids for o in LLM("random:tiny", device="cpu", model_impl=impl)
                   .generate(prompts, params, use_tqdm=False)] for impl in ("tandem", "transformers")}
    assert outs["tandem"] == outs["transformers"]


@pytest.mark.parametrize("changes, reason", [
    ({"architectures": ["FooForCausalLM"]}, "neither tandem nor transformers .* implements it"),
    ({"auto_map": {"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}}, "trust_remote_code"),
    ({"is_encoder_decoder": True}, "decoder-only"),
    ({"vision_config": {"hidden_size": 32}}, "multimodal"),
    ({"layer_types": ["full_attention", "linear_attention"]}, r"layer_types \['linear_attention'\]"),
    ({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}, "state-space"),
    ({"alibi": True}, "ALiBi"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"original_max_position_embeddings": 64, "rope_parameters": {  # Phi-3's own layout
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     "rope_type 'longrope'.*max_model_len <= 64"),
])
def test_what_the_backend_cannot_run_is_refused_at_load(checkpoint_dir, tmp_path, changes, reason):
    path = _copy_with(checkpoint_dir("phi3"), tmp_path / "ckpt", **changes)
    with pytest.raises((ValueError, NotImplementedError), match=reason):
        LLM(str(path), device="cpu", max_model_len=128)


def test_tensor_parallelism_is_refused(checkpoint_dir):
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=2 is not supported"):
        LLM(str(checkpoint_dir("phi3")), device="cpu", tensor_parallel_size=2)


TRITON = r"""
import os, sys
sys.path.insert(0, "tests")
os.environ["TANDEM_ATTENTION"] = "triton"
import torch
from checkpoints import hf_greedy
from tandem import LLM, SamplingParams

gen = torch.Generator().manual_seed(3)
prompts = [torch.randint(0, 448, (n,), generator=gen).tolist() for n in (5, 19, 33)]
llm = LLM(PATH, dtype="float32", device="cpu", max_num_batched_tokens=16, kv_cache_tokens=96, block_size=8,
          max_model_len=96)
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
for prompt, out in zip(prompts, outs):
    assert out.outputs[0].token_ids == hf_greedy(PATH, prompt, 12), prompt
print("triton ok")
"""


def test_the_backend_on_the_triton_kernels(checkpoint_dir):
    """Transformers' q/k/v layouts through the Triton decode and varlen kernels (interpreted on the
    CPU), per-layer windows included: still transformers' tokens."""
    from test_triton_kernels import _run_interpreted

    assert "triton ok" in _run_interpreted(TRITON.replace("PATH", repr(str(checkpoint_dir("cohere2")))))


@pytest.fixture(scope="module")
def llama_backend(checkpoint_dir):
    """The llama checkpoint through the backend, whose transformers model the tests below alter."""
    return load_model(str(checkpoint_dir("llama")), torch.device("cpu"), torch.float32, 64, model_impl="transformers")


def _reloaded(model, hf_config=None):
    """The backend's checks (``transformers_probe``) run again on ``model``'s (altered) transformers model."""
    from tandem.model.models.transformers_backend import TransformersModel

    return TransformersModel(model.config, model.hf, hf_config or model.hf.config)


def test_mixing_tokens_outside_attention_is_refused(llama_backend, monkeypatch):
    mlp = llama_backend.hf.model.layers[0].mlp
    plain = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: plain(x).cumsum(dim=1))  # a running sum over the sequence
    with pytest.raises(NotImplementedError, match="mixes tokens outside its attention layers"):
        _reloaded(llama_backend)


def test_a_logit_transform_tandem_does_not_apply_is_refused(llama_backend, monkeypatch):
    hf = llama_backend.hf
    plain = hf.forward

    def scaled(*args, **kwargs):
        out = plain(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(hf, "forward", scaled)
    with pytest.raises(NotImplementedError, match="transforms its logits after the output head"):
        _reloaded(llama_backend)


def test_a_logit_transform_the_model_does_not_apply_is_refused(llama_backend):
    import copy

    config = copy.deepcopy(llama_backend.hf.config)
    config.logit_scale = 0.5  # a field tandem reads, which LlamaForCausalLM ignores
    with pytest.raises(NotImplementedError, match="transforms its logits"):
        _reloaded(llama_backend, config)


def test_attention_outside_the_interface_is_refused(llama_backend, monkeypatch):
    attn = llama_backend.hf.model.layers[1].self_attn
    monkeypatch.setattr(attn, "forward", lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None))
    with pytest.raises(NotImplementedError, match="of the model's 2 layers, the attention of 1 went through"):
        _reloaded(llama_backend)


def test_layer_calls_tandem_cannot_route_are_refused():
    from tandem.model.models.transformers_attention import LayerCall, spec_of

    def call(with_mask=False, **kwargs):
        return LayerCall(0, 4, 2, 16, 16, with_mask, {"scaling": 0.3, **kwargs})

    assert spec_of(call(sliding_window=8, softcap=30.0), True) == spec_of(call(sliding_window=8, softcap=30.0), False)
    assert spec_of(call(sliding_window=8, softcap=30.0), True).logit_softcap == 30.0
    refused = [(call(s_aux=torch.zeros(4)), False, r"\['s_aux'\]"),
               (call(position_bias=torch.zeros(1)), False, r"\['position_bias'\]"),
               (call(with_mask=True), False, "builds its own attention mask"),
               (call(is_causal=False), False, "bidirectionally"),
               (call(), True, "applies its window only through the attention mask")]
    for bad, sliding, reason in refused:
        with pytest.raises(NotImplementedError, match=reason):
            spec_of(bad, sliding)


def test_classes_whose_attention_bypasses_the_interface_are_refused():
    from tandem.model.models.transformers_config import causal_lm_class

    with pytest.raises(NotImplementedError, match="attention interface"):
        causal_lm_class("BloomForCausalLM", transformers.BloomConfig())
    with pytest.raises(ValueError, match="does not belong to"):
        causal_lm_class("Phi3ForCausalLM", transformers.LlamaConfig())


def test_length_dependent_rope_beyond_its_length_is_refused():
    from tandem.model.models.transformers_config import refuse_rope

    config = transformers.Gemma3TextConfig(max_position_embeddings=256, rope_parameters={
        "full_attention": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    refuse_rope(config, 256)
    with pytest.raises(ValueError, match="rope_type 'dynamic'.*max_model_len <= 256"):
        refuse_rope(config, 257)
