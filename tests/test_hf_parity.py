"""Greedy outputs are token-identical to transformers' generate (float32, CPU) for every supported
architecture, also with chunked prefill and preemption; prefill logits match closely."""
import zlib

import pytest
import torch

from gpu_parity import prefill_logits, relative_error
from checkpoints import ARCHS, build_checkpoint, hf_greedy, hf_prefill_logits

from tandem import LLM, SamplingParams

SETTINGS = {
    "roomy": dict(),
    # 16-token budget forces chunked prefill; 96 KV tokens for 4 sequences force preemption
    "chunked+preempt": dict(max_num_batched_tokens=16, kv_cache_tokens=96, block_size=8, max_model_len=96),
}


@pytest.fixture(scope="module")
def checkpoints(checkpoint_dir):
    return {arch: checkpoint_dir(arch) for arch in ARCHS}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(checkpoints, arch, setting):
    path = checkpoints[arch]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{arch}-{setting}".encode()))
    prompts = [torch.randint(0, 448, (n,), generator=gen).tolist() for n in (5, 17, 40, 3)]
    llm = LLM(str(path), dtype="float32", device="cpu", **SETTINGS[setting])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(path, prompt, 20)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == ("stop" if len(ref) < 20 else "length")
        assert out.prompt_token_ids == prompt
    if setting == "chunked+preempt":
        assert llm.engine.core.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(checkpoints, arch):
    ids = torch.randint(0, 448, (33,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = prefill_logits(str(checkpoints[arch]), ids, "cpu", torch.float32)
    assert relative_error(ours, hf_prefill_logits(checkpoints[arch], ids)) < 1e-5


def test_sharded_checkpoint_loads_identically(sharded_checkpoint, checkpoints):
    sharded = sharded_checkpoint
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    prompt = [[5, 9, 200, 31, 7]]
    params = SamplingParams(temperature=0, max_tokens=12)
    a = LLM(str(sharded), device="cpu").generate(prompt, params, use_tqdm=False)
    b = LLM(str(checkpoints["llama"]), device="cpu").generate(prompt, params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_chat_matches_apply_chat_template_and_generate(checkpoints):
    from transformers import AutoTokenizer

    path = checkpoints["qwen3"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! How are you?"}]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = hf_greedy(path, ids, 16)
    out = LLM(str(path), device="cpu").chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert out[0].prompt_token_ids == ids
    assert out[0].outputs[0].token_ids == ref
    assert out[0].outputs[0].text == tok.decode(ref, skip_special_tokens=True)


def test_text_prompts_and_stop_strings(checkpoints):
    from transformers import AutoTokenizer

    path = checkpoints["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(str(path), device="cpu")
    prompt = "The quick brown fox"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert full.prompt_token_ids == tok.encode(prompt)
    assert text == tok.decode(full.outputs[0].token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"degenerate completion {text!r}"
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    assert len(cut.token_ids) < len(full.outputs[0].token_ids)


def test_legacy_rope_config_layout_loads(tmp_path):
    """Hub checkpoints written by transformers 4.x keep rope_theta + rope_scaling at the top level."""
    import json

    path = build_checkpoint("llama", tmp_path / "legacy", legacy_rope=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in cfg
    ids = torch.randint(0, 448, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    ours = prefill_logits(str(path), ids, "cpu", torch.float32)
    assert relative_error(ours, hf_prefill_logits(path, ids)) < 1e-5


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_mistral_sliding_window_matches_transformers(tmp_path, checkpoints, arch):
    """A window much shorter than the prompts, so attention really is windowed in prefill and decode."""
    import json
    import shutil

    path = tmp_path / f"{arch}-window"
    shutil.copytree(checkpoints[arch], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 448, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_batched_tokens=16)
    assert llm.engine.model_config.sliding_window == 8
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 16)
    ids = prompts[2]
    full = prefill_logits(str(path), ids, "cpu", torch.float32)
    assert relative_error(full, hf_prefill_logits(path, ids)) < 1e-5
    assert relative_error(full, prefill_logits(str(checkpoints[arch]), ids, "cpu", torch.float32)) > 1e-2


def _windowed_mistral(src, dst):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["sliding_window"] = 8
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("arch", ["mistral-window", "mixtral-window", "gemma2", "gemma3"])
def test_prefix_caching_with_sliding_windows_matches_transformers(checkpoints, tmp_path, arch):
    """Prompts sharing a prefix longer than the window and several blocks, one repeated whole: cached
    blocks are reused (prefill skipped) and every output is still transformers' (sliding windows keep
    prefix caching on, as nothing frees a block that falls out of a window)."""
    windowed = arch.endswith("-window")
    path = _windowed_mistral(checkpoints[arch.removesuffix("-window")], tmp_path / arch) if windowed else checkpoints[arch]
    gen = torch.Generator().manual_seed(41)
    prefix = torch.randint(0, 448, (27,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 448, (n,), generator=gen).tolist() for n in (3, 11, 0)]
    prompts.append(list(prompts[1]))
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, max_num_seqs=1)
    assert llm.engine.core.prefix_caching
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 12)
    assert llm.engine.core.stats().prefix_cache_hits >= 3 * 24


def test_gemma_windows_and_softcaps_change_the_logits(checkpoints, tmp_path):
    """The parity checks above are not vacuous: without its windows or its soft-caps the tiny Gemma 2
    computes other logits (the window is shorter than the prompt, the caps bend scores and logits).
    Tied to its embedding (as real Gemmas are), the head is the unscaled table, as in transformers."""
    import json
    import shutil

    import safetensors.torch

    ids = torch.randint(0, 448, (33,), generator=torch.Generator().manual_seed(3)).tolist()
    base = prefill_logits(str(checkpoints["gemma2"]), ids, "cpu", torch.float32)
    for change in ({"sliding_window": 4096}, {"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                   {"tie_word_embeddings": True}):
        path = tmp_path / next(iter(change))
        shutil.copytree(checkpoints["gemma2"], path)
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        if "tie_word_embeddings" in change:  # a tied checkpoint saves no head
            weights = safetensors.torch.load_file(path / "model.safetensors")
            del weights["lm_head.weight"]
            safetensors.torch.save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        ours = prefill_logits(str(path), ids, "cpu", torch.float32)
        assert relative_error(ours, hf_prefill_logits(path, ids)) < 1e-5
        assert relative_error(ours, base) > 1e-2, change


def test_gemma3_transformers4_config_layout_loads(checkpoints, tmp_path):
    """Gemma 3 hub files written before transformers 5: rope_theta + rope_scaling (global layers),
    rope_local_base_freq (sliding layers), sliding_window_pattern instead of layer_types."""
    import json
    import shutil

    path = tmp_path / "gemma3-legacy"
    shutil.copytree(checkpoints["gemma3"], path)
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    for key in ("layer_types", "_sliding_window_pattern"):
        cfg.pop(key, None)
    glob = dict(rope["full_attention"])
    cfg.update(rope_theta=glob.pop("rope_theta"), rope_scaling=glob, sliding_window_pattern=3,
               rope_local_base_freq=rope["sliding_attention"]["rope_theta"])
    (path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 448, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    ours = prefill_logits(str(path), ids, "cpu", torch.float32)
    assert relative_error(ours, hf_prefill_logits(path, ids)) < 1e-5
    assert relative_error(ours, prefill_logits(str(checkpoints["gemma3"]), ids, "cpu", torch.float32)) < 1e-6
