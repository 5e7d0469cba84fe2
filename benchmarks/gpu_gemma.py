"""Gemma's fused kernels on CUDA (issue 28; ``python3 -m benchmarks gpu-checks gemma``).

1. Each kernel of ``tandem.kernels.gemma_fused`` against the torch layers it replaces, bf16, at
   gemma3-1b's shapes (hidden 1152, q heads 4 x 256 and kv 1 x 256 as strided views of one QKV
   projection, intermediate 6912) for T = 1, 256, 4096: the largest difference, the share of elements
   bit-equal, the elements more than one bf16 step apart, and at T = 256 the time of both (CUDA
   events, triton.testing.do_bench). It fails on more than ``_FEW`` elements beyond one step: the
   kernels round where the references round, so a float32 difference in the order of a row's sum or
   in tanh may move an output by one step, not more. For GELU-tanh the step allowed grows by a few
   float32 ulps of 0.5 |gate| |up|: the reference's 1 + tanh cancels for very negative gates.
2. The engine on random:tiny-gemma3 in bf16 with CUDA graphs (the kernels inside the captured
   pieces): sync and async give the same outputs on the CPU suite's randomized cases.
"""
from __future__ import annotations

import torch

_FEW = 8
_SHAPES = dict(hidden=1152, heads=4, kv_heads=1, head_dim=256, intermediate=6912)
_EPS = 1e-6


def _bf16_step(ref: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at each element of ``ref`` (float32; the smallest normal's at 0)."""
    _, exp = torch.frexp(ref.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny))
    return torch.ldexp(torch.ones_like(ref, dtype=torch.float32), exp - 8)


def _report(name: str, out: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor | float = 0.0) -> bool:
    err = (out.float() - ref.float()).abs()
    beyond = int((err > _bf16_step(ref) + slack).sum().item())
    equal = (out == ref).float().mean().item()
    nan = bool(torch.isnan(out).any().item())
    print(f"  {name}: max abs diff {err.max().item():.3g}, {equal:.4%} bit-equal, {beyond} of {out.numel()} "
          f"beyond one bf16 step{', NaN' if nan else ''}")
    return beyond <= _FEW and not nan


def _inputs(t: int) -> dict[str, torch.Tensor]:
    from tandem.model.layers.norms import gemma_norm_factor

    bf = dict(device="cuda", dtype=torch.bfloat16)
    s = _SHAPES
    q_size, kv_size = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    qkv = torch.randn(t, q_size + 2 * kv_size, **bf)
    factor = lambda n: gemma_norm_factor(0.3 * torch.randn(n, device="cuda")).contiguous()  # noqa: E731
    return dict(q=qkv[:, :q_size].view(t, s["heads"], s["head_dim"]),
                k=qkv[:, q_size:q_size + kv_size].view(t, s["kv_heads"], s["head_dim"]),
                x=torch.randn(t, s["hidden"], **bf), res=3 * torch.randn(t, s["hidden"], **bf),
                gate_up=3 * torch.randn(t, 2 * s["intermediate"], **bf),
                f_head=factor(s["head_dim"]), f1=factor(s["hidden"]), f2=factor(s["hidden"]))


def _pairs(a: dict[str, torch.Tensor]):
    """(name, kernel call, reference call, slack) for each fused operation on inputs ``a``."""
    from tandem.kernels import gemma_fused as k
    from tandem.model.layers import mlp, norms
    from tandem.model.models.gemma import norm_add_norm

    gate, up = a["gate_up"].float().chunk(2, dim=-1)
    return [
        ("q_norm [T, 4, 256]", lambda: k.gemma_rms_norm(a["q"], a["f_head"], _EPS),
         lambda: norms.gemma_rms_norm(a["q"], a["f_head"], _EPS), 0.0),
        ("k_norm [T, 1, 256]", lambda: k.gemma_rms_norm(a["k"], a["f_head"], _EPS),
         lambda: norms.gemma_rms_norm(a["k"], a["f_head"], _EPS), 0.0),
        ("norm [T, 1152]", lambda: k.gemma_rms_norm(a["x"], a["f1"], _EPS),
         lambda: norms.gemma_rms_norm(a["x"], a["f1"], _EPS), 0.0),
        ("norm_add_norm -> normed", lambda: k.norm_add_norm(a["x"], a["res"], a["f1"], a["f2"], _EPS)[0],
         lambda: norm_add_norm(a["x"], a["res"], a["f1"], a["f2"], _EPS)[0], 0.0),
        ("norm_add_norm -> stream", lambda: k.norm_add_norm(a["x"], a["res"], a["f1"], a["f2"], _EPS)[1],
         lambda: norm_add_norm(a["x"], a["res"], a["f1"], a["f2"], _EPS)[1], 0.0),
        ("gelu_tanh_mul [T, 6912]", lambda: k.gelu_tanh_mul(a["gate_up"]), lambda: mlp.gelu_tanh_mul(a["gate_up"]),
         2.0 ** -21 * 0.5 * gate.abs() * up.abs()),
    ]


def kernels() -> bool:
    import triton.testing

    torch.manual_seed(0)
    ok = True
    for t in (1, 256, 4096):
        print(f"gemma kernels vs torch, bf16, T = {t}:")
        for name, kernel, reference, slack in _pairs(_inputs(t)):
            ok &= _report(name, kernel(), reference(), slack)
            if t == 256:
                us = [triton.testing.do_bench(f) * 1e3 for f in (kernel, reference)]
                print(f"    kernel {us[0]:.1f} us, torch ops {us[1]:.1f} us")
    return ok


def engine(num_cases: int) -> bool:
    from differential import compare, make_case, run_case

    failures = 0
    for seed in range(7200, 7200 + num_cases):
        case = make_case(seed, "random:tiny-gemma3")
        sync = run_case(case, False, device="cuda", dtype="bfloat16", cuda_graphs=True)
        asyn = run_case(case, True, device="cuda", dtype="bfloat16", cuda_graphs=True)
        problems = compare(case, sync, asyn)
        if problems:
            print(case.describe() + "\n" + "\n".join(problems))
            failures += 1
    print(f"gemma engine (random:tiny-gemma3, bf16, CUDA graphs, fused kernels): sync == async in "
          f"{num_cases - failures}/{num_cases} cases")
    return failures == 0


def check(num_cases: int = 10) -> bool:
    from tandem.model.loader import load_model

    model = load_model("random:tiny-gemma3", torch.device("cuda"), torch.bfloat16, 64)
    print(f"random:tiny-gemma3 on CUDA in bf16 takes the fused kernels: {model.fused}")
    kernels_ok = kernels()
    return engine(num_cases) and kernels_ok and model.fused
