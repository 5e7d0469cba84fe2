"""Where a decode step's GPU time goes: the engine's eager forward under torch.profiler, kernels
summed by name over a few steps. Usage (CUDA):

    python scripts/profile_step.py --model random:llama3.2-1b --batch 256 --context 512 [--steps 3]"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    from torch.profiler import ProfilerActivity, profile

    from tandem import LLM, SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random:llama3.2-1b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    llm = LLM(args.model, max_num_seqs=args.batch, max_model_len=args.context + 64, enforce_eager=True,
              async_batching=False)
    engine = llm.engine
    gen = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        engine.add_request(str(i), None, SamplingParams(max_tokens=60, ignore_eos=True, detokenize=False),
                           prompt_token_ids=torch.randint(0, 1000, (args.context,), generator=gen).tolist())
    while engine.core.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.core.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            counts[e.name] += 1
    total = sum(totals.values())
    print(f"{args.model} decode, batch {args.batch}, context ~{args.context}: {total / args.steps / 1e3:.3f} ms of "
          "kernels per step")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[:18]:
        print(f"  {t / args.steps / 1e3:7.3f} ms {t / total:6.1%} x{counts[name] // args.steps:<4} {name[:90]}")
    engine.abort_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
