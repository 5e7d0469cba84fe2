"""Structured output on CUDA (the stream executor, CUDA graphs, bf16 and float32), for gpu_checks.py:

- constrained differential: the CPU suite's randomized cases with every request constrained, sync ==
  async on CUDA with graphs (the plain differential check already constrains 30% of them);
- accepted: random specs (JSON schemas, regexes, choices, EBNF grammars) at temperature 0 and 1 in
  bf16; every output ends by its grammar and the standard tools (jsonschema, re) accept it;
- no hidden sync: the async loop with grammar masks under torch's sync debug mode;
- mask fill: the host's time to fill 256 rows of a 128K vocabulary's masks, per row and batched.
"""
from __future__ import annotations

import json
import os
import random
import time

import torch


def constrained_differential(num_cases: int) -> bool:
    from differential import compare, make_case, run_case, with_constraints

    t0, failures = time.time(), 0
    for seed in range(8000, 8000 + num_cases):
        case = with_constraints(make_case(seed), 1.0)
        problems = compare(case, run_case(case, False, device="cuda", dtype="float32", cuda_graphs=True),
                           run_case(case, True, device="cuda", dtype="float32", cuda_graphs=True))
        if problems:
            failures += 1
            print(case.describe() + "\n" + "\n".join(problems))
    print(f"constrained differential (float32, graphs): {num_cases - failures}/{num_cases} identical "
          f"in {time.time() - t0:.0f} s", flush=True)
    return failures == 0


def accepted(num_specs: int) -> bool:
    from structured_cases import GRAMMARS, MAX_TOKENS, accepts, random_spec

    from tandem import LLM, SamplingParams, StructuredOutputsParams

    rng = random.Random(5)
    specs = [random_spec(rng) for _ in range(num_specs)] + [StructuredOutputsParams(grammar=g) for g in GRAMMARS]
    llm = LLM("random:tiny", dtype="bfloat16", max_num_seqs=64, max_model_len=512)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in specs]
    params = [SamplingParams(seed=i, temperature=float(i % 2), max_tokens=MAX_TOKENS, structured_outputs=s)
              for i, s in enumerate(specs)]
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.shutdown()
    bad = [(s, o.outputs[0].text, o.outputs[0].finish_reason) for s, o in zip(specs, outs)
           if o.outputs[0].finish_reason != "stop" or not accepts(s, o.outputs[0].text)]
    print(f"accepted (bf16, async, graphs): {len(specs) - len(bad)}/{len(specs)} in {time.time() - t0:.1f} s",
          bad[:3], flush=True)
    return not bad


def no_hidden_sync_with_masks() -> bool:
    from tandem import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM("random:tiny", max_num_seqs=16, max_model_len=512)
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
              "required": ["id", "name"]}
    prompts = [torch.randint(0, 500, (n,)).tolist() for n in (30, 70, 120, 9)]
    params = [SamplingParams(max_tokens=48, temperature=0.7, seed=i, ignore_eos=True, detokenize=False,
                             structured_outputs=StructuredOutputsParams(json=schema) if i % 2
                             else StructuredOutputsParams(regex="[a-z ]{10,60}")) for i in range(4)]
    from gpu_checks import hidden_syncs

    try:
        syncs = hidden_syncs(lambda: llm.generate(prompts, params, use_tqdm=False))
    finally:
        llm.engine.shutdown()
    print(f"no hidden sync with grammar masks: {len(syncs)} synchronizing calls"
          + "".join(f"\n  {m}" for m in syncs[:5]), flush=True)
    return not syncs


def mask_fill_times(rows: int = 256) -> None:
    """Figures only: xgrammar's per-row fill against its threaded batch fill, on this machine's cores."""
    import numpy as np
    import xgrammar as xgr

    from tandem.bench.workload import BENCH_JSON_SCHEMA
    from tandem.engine.structured.vocab import tokenizer_info

    info = tokenizer_info("random:llama3.2-1b", 128256, [128001])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(BENCH_JSON_SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled, override_stop_tokens=[128001]) for _ in range(rows)]
    for m in matchers:
        for byte in b'{"id": 12, "name": "ab':
            m.accept_token(byte)
    mask = np.empty((rows, (128256 + 31) // 32), np.int32)
    fills = [("per row", lambda: [m.fill_next_token_bitmask(mask, i) for i, m in enumerate(matchers)])]
    fills += [(f"batch, {k} threads", (lambda b: lambda: b.batch_fill_next_token_bitmask(matchers, mask))(
        xgr.BatchGrammarMatcher(k))) for k in (1, 4, 8)]
    for label, fill in fills:
        fill()
        t0 = time.perf_counter()
        for _ in range(20):
            fill()
        print(f"mask fill {rows} rows x 128K vocabulary, {label}: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms",
              flush=True)


def structured() -> bool:
    ok = constrained_differential(int(os.environ.get("TANDEM_STRUCTURED_CASES", "8")))
    ok &= accepted(int(os.environ.get("TANDEM_STRUCTURED_SPECS", "48")))
    ok &= no_hidden_sync_with_masks()
    mask_fill_times()
    return ok
