"""Several `tandem bench` workloads (async) on one model load, a JSON file per workload.

    python3 scripts/bench_sweep.py MODEL OUT_DIR MAX_MODEL_LEN NAME:REQUESTS:PROMPT:MAX_TOKENS[:k=v,...] ...

e.g. `M_feat:256:256:512:logprobs=5,repetition_penalty=1.1`. The engine takes max_num_seqs = the
largest REQUESTS; the first workload also pays for compiling kernels, so start with a short one."""
import logging
import sys

import torch

from tandem import LLM
from tandem.bench.api import bench

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
model, out, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
specs = sys.argv[4:]  # name:num_requests:prompt:max_tokens[:extra=k=v,...]
llm = LLM(model, max_model_len=max_len, max_num_seqs=max(int(s.split(":")[1]) for s in specs))
free, total = torch.cuda.mem_get_info()
print(f"after load: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
      f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB, free {free / 2**30:.2f} of {total / 2**30:.2f} GiB", flush=True)
for spec in specs:
    name, n, p, m, *extra = spec.split(":")
    kw = {}
    for item in (extra[0].split(",") if extra else []):
        k, v = item.split("=")
        kw[k] = float(v) if "." in v else int(v)
    try:
        bench(model, modes=["async"], num_requests=int(n), prompt_len=p, max_tokens=m, progress=False, llm=llm,
              json_path=f"{out}/{name}.json", **kw)
    except Exception as e:  # one failed workload must not hide the others
        print(f"{name} FAILED: {type(e).__name__}: {e}", flush=True)
