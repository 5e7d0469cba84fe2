"""Every Triton kernel compiles for the H100 (sm_90) on this GPU-less machine, in the dtypes and
constexpr settings the engine launches. The interpreter runs kernels as Python, so it accepts code
the compiler rejects (a plain Python function called from a kernel, say): this catches that in CI."""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

FLOATS = {"eps", "qk_scale", "cap", "v_scale", "k_scale"}


def _compile(fn, pointers: dict[str, str], constexprs: dict) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, pointers.get("*", "*fp32"))
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "cubin" in kernel.asm


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_attention_kernels_compile(dtype):
    from tandem.kernels import paged_decode, paged_varlen

    io = {"*": f"*{dtype}", "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64", "query_start_ptr": "*i64",
          "part_acc_ptr": "*fp32", "part_stats_ptr": "*fp32"}
    precision = "ieee" if dtype == "fp32" else "tf32"
    for softcap in (False, True):  # Gemma 2's soft-capped scores
        for splits in (1, 4):
            _compile(paged_decode._paged_decode_kernel, io,
                     dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, DIM_PAD=128, PAGE=16, BLOCK_N=64, NUM_SPLITS=splits,
                          MIN_SPLIT=256, SOFTCAP=softcap, PRECISION=precision, PDL=softcap))
        _compile(paged_varlen._paged_varlen_kernel, io,
                 dict(GROUP=4, HEAD_DIM=80, DIM_PAD=128, PAGE=16, BLOCK_M=64, BLOCK_N=64, SOFTCAP=softcap,
                      PRECISION=precision))
    _compile(paged_decode._combine_splits_kernel, {"out_ptr": f"*{dtype}"},
             dict(NUM_SPLITS=4, SPLITS_PAD=4, HEAD_DIM=128, DIM_PAD=128, PDL=True))


def test_sampling_and_fused_kernels_compile():
    from tandem.kernels import fused, sampling

    _compile(sampling._sample_kernel, {"seeds_ptr": "*i64", "gen_index_ptr": "*i64", "part_col_ptr": "*i32"},
             dict(BLOCK=1024))
    _compile(sampling._merge_splits_kernel, {"part_col_ptr": "*i32", "out_ptr": "*i64"}, dict(SPLITS_PAD=32))
    for has_res in (True, False):
        _compile(fused._add_rms_norm_kernel, {"*": "*bf16"}, dict(HAS_RES=has_res, BLOCK=4096, PDL=has_res))
    _compile(fused._rope_store_kv_kernel, {"*": "*bf16", "pos_ptr": "*i64", "slot_ptr": "*i64"},
             dict(HALF=64, HALF_PAD=64, Q_PAD=32, KV_PAD=8, FP8_MANTISSA=0, FP8_MIN_EXP=0, FP8_MAX=0.0, PDL=True))
    _compile(fused._silu_mul_kernel, {"*": "*bf16"}, dict(BLOCK=1024, PDL=True))


@pytest.mark.parametrize("logits", ["bf16", "fp32"])
def test_sampling_stage_kernels_compile(logits):
    from tandem.kernels import logprobs, penalties, top_k_top_p

    _compile(top_k_top_p._cutoff_kernel, {"logits_ptr": f"*{logits}", "top_k_ptr": "*i64"}, dict(BLOCK=256))
    _compile(logprobs._logprob_kernel, {"logits_ptr": f"*{logits}", "chosen_ptr": "*i64", "rank_ptr": "*i64"},
             dict(BLOCK=1024))
    ints = {"rows_ptr": "*i64", "prompt_lens_ptr": "*i64", "gen_index_ptr": "*i64", "keys_ptr": "*i64"}
    _compile(penalties._keys_kernel, {**ints, "history_ptr": "*i32"}, dict(BLOCK=1024))
    _compile(penalties._apply_kernel, ints, dict(BLOCK=1024))



def test_programmatic_dependent_launch_is_off_unless_asked(monkeypatch):
    """Off by default and everywhere but CUDA (kernels/pdl.py); TANDEM_PDL=1 turns it on where supported."""
    import torch

    from tandem.kernels import pdl

    cuda = torch.device("cuda", 0)  # a descriptor: no GPU is touched while the switch is off
    monkeypatch.delenv("TANDEM_PDL", raising=False)
    assert pdl.pdl_launch(cuda) == {"PDL": False} and pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TANDEM_PDL", "1")
    monkeypatch.setattr(pdl, "_supported", lambda index: True)
    assert pdl.pdl_launch(cuda) == {"PDL": True, "launch_pdl": True}
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
