"""The anchor: transformers' own continuous batching (``generate_batch``) on the same weights and
prompts, in each mode it offers on this machine. Our weights are shared with it, not copied."""
from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import time
from typing import Any

import torch

from tandem.bench.workload import Workload
from tandem.llm import LLM
from tandem.model.models.llama import ModelWeights
from tandem.model.model_config import ModelConfig

logger = logging.getLogger(__name__)

# name -> (use_cuda_graph, use_async_batching); transformers enables async batching only with graphs
HF_MODES: dict[str, tuple[bool, bool]] = {"sdpa-eager": (False, False), "sdpa-cuda-graphs": (True, False),
                                          "sdpa-cuda-graphs-async": (True, True)}


def hf_config(cfg: ModelConfig):
    import transformers

    config_cls = getattr(transformers, cfg.architecture.replace("ForCausalLM", "Config"))
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                  eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        fields["rope_parameters"] = rope  # transformers 5
    else:
        fields.update(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
    return config_cls(**fields)


def hf_state_dict(cfg: ModelConfig, w: ModelWeights) -> dict[str, torch.Tensor]:
    """Views into our fused weights under transformers' names."""
    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = w.lm_head
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        gate, up = layer.gate_up.chunk(2)
        sd.update({f"{p}self_attn.q_proj.weight": q, f"{p}self_attn.k_proj.weight": k,
                   f"{p}self_attn.v_proj.weight": v, f"{p}self_attn.o_proj.weight": layer.o,
                   f"{p}mlp.gate_proj.weight": gate, f"{p}mlp.up_proj.weight": up, f"{p}mlp.down_proj.weight": layer.down,
                   f"{p}input_layernorm.weight": layer.input_norm, f"{p}post_attention_layernorm.weight": layer.post_norm})
        if layer.qkv_bias is not None:
            for name, b in zip("qkv", layer.qkv_bias.split([cfg.q_size, cfg.kv_size, cfg.kv_size])):
                sd[f"{p}self_attn.{name}_proj.bias"] = b
        if layer.q_norm is not None:
            sd[f"{p}self_attn.q_norm.weight"], sd[f"{p}self_attn.k_norm.weight"] = layer.q_norm, layer.k_norm
    return sd


def build_hf_model(llm: LLM):
    import transformers

    worker = llm.engine.worker
    cfg, weights = llm.engine.model_config, worker.model.weights
    model_cls = getattr(transformers, cfg.architecture)
    with torch.device(worker.device):
        model = model_cls._from_config(hf_config(cfg), attn_implementation="sdpa", dtype=worker.dtype)
    model.load_state_dict(hf_state_dict(cfg, weights), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _cb_config(mode: str, w: Workload, block: int = 256):
    from transformers.generation import ContinuousBatchingConfig

    graphs, async_batching = HF_MODES[mode]
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    blocks_needed = w.num_requests * (-(-(w.prompt_len.hi + w.max_tokens.hi) // block) + 1)
    wanted = {"page_size" if "page_size" in fields else "block_size": block, "num_blocks": blocks_needed,
              "max_batch_tokens": 8192, "use_cuda_graph": graphs, "use_async_batching": async_batching,
              "auto_switch_to_flash": False}
    return ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in fields})


def _run_mode(model, prompts: list[list[int]], w: Workload, mode: str) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=w.max_tokens.hi, eos_token_id=-1, pad_token_id=0,
                           do_sample=w.temperature > 0, **({"temperature": w.temperature} if w.temperature else {}))
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=_cb_config(mode, w),
                               progress_bar=False)
    wall = time.perf_counter() - t0
    failed = [r.error for r in out.values() if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    tokens = sum(len(r.generated_tokens) for r in out.values())
    window = max(r.lifespan[1] for r in out.values()) - min(r.lifespan[0] for r in out.values())
    # wall includes transformers' per-call set-up (cache, warm-up, graph capture); the window does not
    return {"mode": mode, "wall_s": wall, "generation_window_s": window, "output_tokens": tokens,
            "output_tok_per_s": tokens / window, "output_tok_per_s_wall": tokens / wall,
            "token_ids": [r.generated_tokens for r in out.values()]}


def run_hf_anchor(llm: LLM, prompts: list[list[int]], w: Workload, modes: list[str] | None) -> list[dict[str, Any]]:
    import transformers

    llm.engine.worker.release_memory()
    model = build_hf_model(llm)
    results = []
    default = list(HF_MODES) if llm.engine.worker.device.type == "cuda" else ["sdpa-eager"]  # graphs need CUDA
    for mode in modes or default:
        if mode not in HF_MODES:
            raise ValueError(f"unknown transformers mode {mode!r}; choose from {list(HF_MODES)}")
        try:
            res = _run_mode(model, prompts, w, mode)
        except Exception as exc:  # an anchor mode that does not run here is reported, not fatal
            logger.warning("transformers %s failed: %s", mode, exc)
            res = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
        res["transformers"] = transformers.__version__
        results.append(res)
        gc.collect()
    return results
