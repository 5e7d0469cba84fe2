"""How many variants of each Triton kernel a process compiled: after the engine's start-up, and after
each of several random-length workloads. A variant compiled after start-up is a stall of the whole
batch mid-run (a second or more); the count should stay flat.

    python3 scripts/kernel_variants.py [MODEL]"""
import sys

import torch

from tandem import LLM
from tandem.bench.api import bench
from tandem.kernels import fused, logprobs, paged_decode, paged_varlen, penalties, top_k_top_p


def variants() -> dict[str, int]:
    out = {}
    for module in (fused, logprobs, paged_decode, paged_varlen, penalties, top_k_top_p):
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if isinstance(caches, dict):
                out[name] = sum(len(c[0]) for c in caches.values())
    return out


if not torch.cuda.is_available():
    sys.exit("kernel_variants.py needs a CUDA GPU: on a CPU the engine runs no Triton kernels")
model = sys.argv[1] if len(sys.argv) > 1 else "random:llama3.2-1b"
llm = LLM(model, max_num_seqs=256, max_model_len=1024)
print("after start-up:", {k: v for k, v in variants().items() if v}, flush=True)
for seed, (prompt, out, temp) in enumerate([("16:512", "16:256", 0.0), ("8:700", "1:300", 0.0),
                                            ("3:600", "4:200", 0.0), ("16:512", "16:128", 1.0)]):
    before = variants()
    bench(model, modes=["async"], num_requests=200, prompt_len=prompt, max_tokens=out, temperature=temp,
          workload_seed=seed, progress=False, llm=llm)
    new = {k: v - before.get(k, 0) for k, v in variants().items() if v != before.get(k, 0)}
    print(f"workload {seed} (prompts {prompt}, outputs {out}, temperature {temp}): new variants {new}", flush=True)
torch.cuda.synchronize()
