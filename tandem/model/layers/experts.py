"""Mixture-of-experts: routing and the experts' gated MLPs, in plain PyTorch.

This is the reference: what the CPU runs, and the oracle of the fused Triton kernel
(``tandem/kernels/fused_moe.py``) in its tests. Layouts (transformers 5's fused expert weights):

- ``w13``: [E, 2 * I, H], the gate projection's I rows then the up projection's, per expert;
- ``w2``: [E, H, I], the down projection, per expert;
- routing: ``topk_ids`` [T, k] (int) and ``topk_weights`` [T, k] (float32) for T tokens.

w13 and w2 are dense tensors of the model dtype, or both FP8 with their scales (``quant.fp8_experts.
Fp8Experts``, an FP8 checkpoint on the native FP8 path), or both 4-bit (``quant.int4_experts.
Int4Experts``, a 4-bit checkpoint where the W4A16 GEMM runs): the kernel dequantizes those in
registers, the reference one expert at a time as it reads it (``quant.expert_weights.expert_weight``),
to the hidden states' dtype.

A token's output is ``sum_j topk_weights[t, j] * down_e(act(gate_e(x)) * up_e(x))`` over its k experts
``e = topk_ids[t, j]``; experts no token routes to are never read."""
from __future__ import annotations

import torch

from tandem.kernels import triton_available
from tandem.model.layers.mlp import gelu_tanh_mul, silu_mul
from tandem.model.quant.expert_weights import ExpertWeight, expert_weight
from tandem.switches import switch

ACTIVATIONS = {"silu": silu_mul, "gelu_pytorch_tanh": gelu_tanh_mul}


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: (weights [T, k] float32, ids [T, k] int32), the top-k experts of each token.

    ``renormalize`` (Qwen3-MoE's ``norm_topk_prob``, always so for Mixtral) rescales the k weights
    to sum to one; the softmax runs in float32 whatever the logits' dtype, as transformers does."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def experts_reference(hidden: torch.Tensor, w13: ExpertWeight, w2: ExpertWeight, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """[T, H] -> [T, H]: each expert's tokens through its gated MLP, weighted and summed per token.

    Ids lie in [0, E] for E = ``w13.shape[0]`` experts: the id E is the dropped-route sentinel
    (expert parallelism: a route to an expert another rank holds), which contributes nothing, its
    weight unread; any other id raises ValueError. The weighted sum runs in float32 and is cast back
    once (transformers sums in the hidden dtype: the same in float32; in bf16 one rounding instead of k)."""
    act, num_experts = ACTIVATIONS[activation], w13.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.long()
    for expert in torch.unique(flat_ids).tolist():
        if expert == num_experts:
            continue  # dropped: computed on the rank that holds the expert
        if not 0 <= expert < num_experts:
            raise ValueError(f"experts_reference: expert id {expert} outside [0, {num_experts}] "
                             f"for {num_experts} experts")
        token, slot = torch.nonzero(flat_ids == expert, as_tuple=True)
        x = hidden[token]
        gate_up, down = expert_weight(w13, expert, hidden.dtype), expert_weight(w2, expert, hidden.dtype)
        y = act(x @ gate_up.t()) @ down.t()
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(hidden.dtype)


def use_fused_kernel(device: torch.device) -> bool:
    """The fused Triton kernel on CUDA, the reference elsewhere. ``TANDEM_MOE=reference`` forces the
    reference (to compare on a GPU); ``triton`` forces the kernel even on a CPU, where it runs
    through Triton's interpreter (tests set ``TRITON_INTERPRET=1``)."""
    choice = switch("TANDEM_MOE")
    return (choice == "triton" or (choice == "auto" and device.type == "cuda")) and triton_available()


def experts(hidden: torch.Tensor, w13: ExpertWeight, w2: ExpertWeight, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The MoE layer's experts, as the model calls them: the fused Triton kernel on CUDA
    (``tandem/kernels/fused_moe.py``: no host sync, capturable in a CUDA graph), the reference
    elsewhere (it reads the routed experts back to the host)."""
    if use_fused_kernel(hidden.device):
        from tandem.kernels.fused_moe import fused_experts  # imports Triton: only where it runs

        return fused_experts(hidden, w13, w2, topk_weights, topk_ids, activation)
    return experts_reference(hidden, w13, w2, topk_weights, topk_ids, activation)
