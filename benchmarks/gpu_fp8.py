"""FP8 weights on a GPU (``python scripts/gpu_checks.py fp8``; needs compute capability >= 8.9).

1. The FP8 linear (row-wise scales: W8A16 up to its ``MAX_ROWS`` rows, judged against the dequantized
   weight in bf16 since it keeps the activations in bf16; ``torch._scaled_mm`` above, judged against
   the same arithmetic in float32, ``reference_linear``: error of the bf16 output only, and against the
   dequantized weight in bf16, the activations' FP8 rounding too; the Triton block GEMM for 128 x 128
   blocks; each timed in CUDA graphs), at the 8B model's projection shapes, for dynamic per-token,
   clamped (fbgemm) and static activation scales; no NaN; no host synchronisation; a CUDA graph
   replaying it with new inputs equals the eager call.
2. The engine on an FP8 checkpoint (tests/fp8_checkpoints.py, bf16): its projections are FP8 on the
   device; sync == async, eager and with graphs, token for token; greedy agreement of graphs with
   eager and with the model of the dequantized weights, recorded (on random weights near-ties flip:
   it means something on a real checkpoint only)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def linear_checks() -> bool:
    from tandem.kernels.w8a16 import MAX_ROWS as W8A16_ROWS
    from tandem.model.quant.fp8 import fp8_linear, quantize_per_channel, reference_linear

    ok, gen = True, torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).to(torch.bfloat16)
        w = quantize_per_channel(dense)
        for m in (1, 7, 32, 256):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            for label, input_scale, ub in (("dynamic", None, None), ("clamped", None, 2.5),
                                           ("static", torch.tensor([x.abs().max().item() / 448], device="cuda"), None)):
                w.input_scale, w.scale_ub = input_scale, ub
                out = fp8_linear(x, w)
                err_ref, err_dense = _rel(out, reference_linear(x, w)), _rel(out, F.linear(x, w.dequantize(torch.bfloat16)))
                if m <= W8A16_ROWS:  # W8A16: the activations stay bf16, so the dequantized linear is the reference
                    good = err_dense < 1e-2
                else:
                    good = err_ref < 1e-2 and err_dense < (0.5 if label == "clamped" else 6e-2)
                good &= not out.isnan().any().item()
                ok &= good
                if not good or m in (1, 256):
                    print(f"fp8 {name} [{n}x{k}] m={m} {label}: rel err {err_ref:.1e} vs float32 arithmetic, "
                          f"{err_dense:.1e} vs the dequantized bf16 linear{'' if good else '  FAIL'}")
        w.input_scale, w.scale_ub = None, None
    return ok & _no_sync_and_graph(w) & block_checks()


def _blocks(dense: torch.Tensor, block: tuple[int, int]):
    """The block-wise FP8 weight of ``dense`` (one scale per block, as the checkpoints store them)."""
    from fp8_checkpoints import Fp8Format, quantize
    from tandem.model.quant.fp8 import Fp8Weight

    q, scale, _ = quantize(dense.float(), Fp8Format("block", {}, block=block))
    return Fp8Weight(q, scale.float().contiguous(), block)


def _graph_us(fn) -> float:
    """GPU time of one call, from a CUDA graph of ten (what a decode step replays: no launch costs)."""
    from tp_gpu_checks import _graph_ms

    return _graph_ms(lambda: [fn() for _ in range(10)]) * 100


def block_checks() -> bool:
    """Block-wise weights (128 x 128) through the Triton GEMM, and the paths of row-wise weights timed
    in CUDA graphs: the engine's (``fp8_linear``: Triton up to TRITON_MAX_ROWS rows, then
    ``_scaled_mm``), each of the two (Triton with its split-K heuristic and without), the activation
    quantization alone, and bf16."""
    from tandem.kernels.fp8_gemm import fp8_block_gemm
    from tandem.kernels.w8a16 import MAX_ROWS as W8A16_ROWS
    from tandem.model.quant.fp8 import fp8_linear, quantize_activations, quantize_per_channel, reference_linear

    ok, gen = True, torch.Generator(device="cuda").manual_seed(1)
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).to(torch.bfloat16)
        w, rows = _blocks(dense, (128, 128)), quantize_per_channel(dense)
        for m in (1, 8, 32, 64, 256):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            out = fp8_linear(x, w)
            err_ref, err_dense = _rel(out, reference_linear(x, w)), _rel(out, F.linear(x, w.dequantize(torch.bfloat16)))
            # up to W8A16's rows only the weights are FP8 (the activations stay bf16): its reference
            # is the dequantized bf16 linear; above, the activations are quantized as the reference does
            exact = err_dense if m <= W8A16_ROWS else err_ref
            good = exact < 1e-2 and err_dense < 6e-2 and not out.isnan().any()
            ok &= good

            def scaled_mm():
                xq, xs = quantize_activations(x, None, None)
                return torch._scaled_mm(xq, rows.weight.t(), scale_a=xs, scale_b=rows.scale.view(1, -1),
                                        out_dtype=x.dtype)

            def triton_rows(split=None):
                xq, xs = quantize_activations(x, None, None)
                return fp8_block_gemm(xq, xs, rows.weight, rows.scale.view(-1, 1), (1, k), x.dtype, split_k=split)

            errs = [_rel(f(), reference_linear(x, rows)) for f in (scaled_mm, triton_rows)]
            ok &= max(errs) < 1e-2
            times = {"block": _graph_us(lambda: fp8_linear(x, w)), "rows (engine)": _graph_us(lambda: fp8_linear(x, rows)),
                     "rows _scaled_mm": _graph_us(scaled_mm), "rows Triton": _graph_us(triton_rows),
                     "rows Triton unsplit": _graph_us(lambda: triton_rows(1)),
                     "quantization": _graph_us(lambda: quantize_activations(x, None, None)),
                     "bf16": _graph_us(lambda: F.linear(x, dense))}
            print(f"fp8 {name} [{n}x{k}] m={m}: block rel err {err_ref:.1e} vs float32 arithmetic, {err_dense:.1e} vs "
                  f"dequantized bf16; rows {errs[0]:.1e} (_scaled_mm), {errs[1]:.1e} (Triton){'' if good else '  FAIL'}; "
                  "us in graphs: " + ", ".join(f"{key} {t:.1f}" for key, t in times.items()))
    return ok


def _no_sync_and_graph(w) -> bool:
    from tandem.model.quant.fp8 import fp8_linear

    x = torch.randn(32, w.shape[1], device="cuda", dtype=torch.bfloat16)
    fp8_linear(x, w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8_linear(x, w)
        no_sync = True
    except RuntimeError as exc:
        print(f"fp8: the FP8 linear synchronises: {exc}")
        no_sync = False
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_linear(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    same = torch.equal(out, fp8_linear(x, w))
    print(f"fp8: no host synchronisation {no_sync}; CUDA graph replay == eager with new inputs {same}")
    return no_sync and same


def engine_checks() -> bool:
    from checkpoints import build_checkpoint
    from fp8_checkpoints import fp8_checkpoint
    from tandem import LLM, SamplingParams
    from tandem.model.quant.fp8 import Fp8Weight

    tmp = Path(tempfile.mkdtemp())
    fp8, ref = fp8_checkpoint(build_checkpoint("llama", tmp / "src"), tmp / "fp8", "ct-channel")
    prompts = [torch.randint(5, 440, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 17, 40, 9)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    runs, stored = {}, None
    for key in ((False, True), (True, True), (False, False), (True, False), ("ref", None)):  # (async, eager)
        llm = LLM(str(ref if key[0] == "ref" else fp8), dtype="bfloat16", max_num_seqs=8, kv_cache_tokens=4096,
                  **({} if key[0] == "ref" else dict(async_batching=key[0], enforce_eager=key[1])))
        if stored is None:
            stored = isinstance(llm.engine.worker.model.weights.layers[1].qkv, Fp8Weight)
        runs[key] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.engine.shutdown()
    same = runs[(False, True)] == runs[(True, True)] and runs[(False, False)] == runs[(True, False)]

    def agreement(a, b) -> float:
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        return sum(x == y for x, y in pairs) / len(pairs)

    print(f"fp8 engine: projections stored FP8 {stored}; sync == async (eager, graphs) {same}; greedy agreement "
          f"(recorded; random weights diverge at near-ties): graphs vs eager {agreement(runs[(True, False)], runs[(True, True)]):.0%}, "
          f"with the dequantized bf16 model {agreement(runs[(True, True)], runs[('ref', None)]):.0%}")
    return stored and same


def fp8_checks() -> bool:
    if torch.cuda.get_device_capability() < (8, 9):
        print("fp8: this GPU has no FP8 GEMMs (compute capability < 8.9): FP8 weights run dequantized there")
        return True
    return linear_checks() & engine_checks()
