"""Parity with transformers: greedy outputs, and prefill logits of one forward pass.

Used by the CPU tests and by ``scripts/gpu_checks.py parity`` on a CUDA machine."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tandem.model.attention import AttentionInputs, step_attention
from tandem.model.loader import load_model
from tandem.worker.kv_cache import allocate_kv_cache


def prefill_logits(path: str, ids: list[int], device: str, dtype: torch.dtype, block_size: int = 16) -> torch.Tensor:
    """Our model's logits [len(ids), vocab] for one sequence prefilled in one step (blocks 1..n)."""
    model = load_model(path, torch.device(device), dtype, max_positions=len(ids) + 1)
    n, blocks = len(ids), -(-len(ids) // block_size)
    cache = allocate_kv_cache(model.kv_spec, blocks + 1, block_size, torch.device(device), dtype)
    pos = torch.arange(n, device=device)
    inputs = AttentionInputs(slot_mapping=pos + block_size, block_tables=torch.arange(1, blocks + 1, device=device)[None],
                             query_start=torch.tensor([0, n], device=device), seq_lens=torch.tensor([n], device=device),
                             positions=pos, max_q=n, block_size=block_size)
    hidden = model.forward(torch.tensor(ids, device=device), pos, cache, step_attention(inputs))
    return model.compute_logits(hidden).float().cpu()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def parity(device: str = "cuda") -> bool:
    from checkpoints import ARCHS, build_checkpoint, hf_greedy, hf_prefill_logits

    from tandem import LLM, SamplingParams

    ok = True
    gen = torch.Generator().manual_seed(7)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            path = build_checkpoint(arch, Path(tmp) / arch)
            llm = LLM(str(path), device=device, dtype="float32", max_num_batched_tokens=16, kv_cache_tokens=512,
                      block_size=8, max_model_len=128)
            vocab = llm.engine.model_config.vocab_size
            prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 23, 41, 2)]
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
            same = [o.outputs[0].token_ids == hf_greedy(path, p, 20) for o, p in zip(outs, prompts)]
            del llm
            ids = torch.randint(0, vocab, (48,), generator=gen).tolist()
            path = build_checkpoint(arch, Path(tmp) / f"{arch}-realistic", scales="realistic")
            ours = prefill_logits(str(path), ids, device, torch.bfloat16)
            ref32 = hf_prefill_logits(path, ids)
            ref16 = hf_prefill_logits(path, ids, dtype=torch.bfloat16, device=device)
            err = relative_error(ours, ref16)
            print(f"parity {arch:8s}: fp32 greedy on {device} identical to transformers for {sum(same)}/{len(same)} "
                  f"prompts (chunked prefill + preemption); bf16 prefill logits (weights std 0.02) rel. error "
                  f"vs transformers bf16 "
                  f"{err:.2e} (vs its fp32: ours {relative_error(ours, ref32):.2e}, "
                  f"transformers bf16 {relative_error(ref16, ref32):.2e})")
            ok &= all(same) and err < 1e-2
    return ok
