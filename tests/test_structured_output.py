"""Structured output (issue 23, points 1 and 2): JSON schema, any JSON object, regex, EBNF grammar and
choice, compiled with xgrammar off the step loop and enforced by a token mask filled on the host
after the previous step's tokens arrive. Outputs are checked by the standard tools
(``structured_cases.accepts``); async == sync is in ``test_async_differential.py``."""
from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import pytest
import torch

from structured_cases import GRAMMARS, MAX_TOKENS, accepts, random_spec
from tandem import LLM, SamplingParams, StructuredOutputsParams
from tandem.config import EngineConfig
from tandem.engine.processor import InputProcessor
from tandem.model.sources import resolve_model_config
from tandem.tokenizer import BYTE_EOS, ByteTokenizer
from tandem.worker.grammar_mask import allowed_tokens, apply_grammar_mask

MODEL, VOCAB = "random:tiny", 512
S = StructuredOutputsParams


@pytest.fixture(scope="module")
def llm():
    engine = LLM(MODEL, dtype="float32", max_num_seqs=64, max_model_len=512)
    yield engine
    engine.engine.shutdown()


def _params(spec: StructuredOutputsParams, seed: int, **kw) -> SamplingParams:
    kw = {"temperature": 1.0, "max_tokens": MAX_TOKENS, **kw}
    return SamplingParams(seed=seed, structured_outputs=spec, **kw)


# --- the request field ---------------------------------------------------------------------------------
def test_exactly_one_kind_and_each_field_checked():
    assert S(json={"type": "object"}).kind == "json" and S(json_object=True).kind == "json_object"
    for bad, named in [({}, "sets no kind"), ({"regex": "a", "choice": ["a"]}, "several kinds (regex, choice)"),
                       ({"choice": []}, "structured_outputs.choice"), ({"choice": ["a", ""]}, "structured_outputs.choice"),
                       ({"regex": ""}, "structured_outputs.regex"), ({"json": 3}, "structured_outputs.json"),
                       ({"grammar": " "}, "structured_outputs.grammar"), ({"json_object": False}, "sets no kind"),
                       ({"regex": "a", "disable_any_whitespace": 1}, "disable_any_whitespace"),
                       ({"regex": "a", "reasoning_start": "<think>"}, "reasoning_start needs reasoning_end"),
                       ({"regex": "a", "reasoning_end": ""}, "reasoning_end must be a non-empty string")]:
        with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
            S(**bad)
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs must be"):
        SamplingParams(structured_outputs={"json": {}})
    params = SamplingParams(structured_outputs=S(json={"type": "object", "properties": {}}, choice=None))
    copy = params.checked_copy()
    assert copy.structured_outputs == params.structured_outputs
    assert copy.structured_outputs.json is not params.structured_outputs.json  # nothing shared


@pytest.mark.parametrize("spec, named", [
    (S(json={"type": "foo"}), r"structured_outputs\.json is not valid: .*foo"),
    (S(json="{not json"), r"structured_outputs\.json is not valid JSON"),
    (S(json={"$ref": "#/defs/x"}), r"structured_outputs\.json is not valid"),
    (S(regex="(a"), r"structured_outputs\.regex is not valid: .*parenthesis"),
    (S(grammar='root ::= "a" | b'), r"structured_outputs\.grammar is not valid: .*b"),
])
def test_a_bad_spec_is_refused_before_anything_runs(llm, spec, named):
    with pytest.raises(ValueError, match=named):
        llm.generate(["hi", "there"], [SamplingParams(max_tokens=4), SamplingParams(structured_outputs=spec)],
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_refused_without_a_tokenizer():
    processor = InputProcessor(resolve_model_config(MODEL), None, 512, EngineConfig(MODEL))
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        processor.process("a", None, SamplingParams(structured_outputs=S(regex="a")), prompt_token_ids=[1])


# --- the host's masks, without the engine ---------------------------------------------------------------
def test_200_random_specs_walked_through_their_masks_give_accepted_outputs():
    """Each spec compiled against the byte vocabulary; a random walk takes any token its mask allows
    (read back as the device reads it) until EOS; the text must be accepted by the standard tools."""
    import xgrammar as xgr

    from tandem.engine.structured.compiler import compile_spec
    from tandem.engine.structured.matcher import RequestGrammar
    from tandem.engine.structured.vocab import tokenizer_info

    compiler = xgr.GrammarCompiler(tokenizer_info(MODEL, VOCAB, [BYTE_EOS]), max_threads=1)
    tokenizer, rng = ByteTokenizer(), random.Random(23)
    mask = np.empty((1, VOCAB // 32), np.int32)
    for _ in range(200):
        spec = random_spec(rng)
        grammar, tokens = RequestGrammar(compile_spec(compiler, spec), [BYTE_EOS]), []
        for _ in range(MAX_TOKENS):
            grammar.fill(mask, 0)
            allowed = torch.nonzero(allowed_tokens(torch.from_numpy(mask), VOCAB)[0]).ravel().tolist()
            if BYTE_EOS in allowed and (len(allowed) == 1 or rng.random() < 0.2):
                break
            tokens.append(rng.choice([t for t in allowed if t != BYTE_EOS]))
            assert grammar.advance(tokens) is None
        else:
            raise AssertionError(f"{spec} did not end in {MAX_TOKENS} tokens")
        assert accepts(spec, tokenizer.decode(tokens)), (spec, tokenizer.decode(tokens))


def test_the_device_mask_bans_exactly_the_cleared_bits():
    gen = torch.Generator().manual_seed(0)
    for vocab, rows, chunk in [(100, 3, 150), (512, 5, 1 << 22), (33, 4, 40)]:
        bitmask = torch.randint(-2**31, 2**31 - 1, (rows, -(-vocab // 32)), generator=gen, dtype=torch.int64).int()
        want = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
        assert (allowed_tokens(bitmask, vocab).numpy() == want).all()
        logits = torch.randn(rows + 3, vocab, dtype=torch.float64, generator=gen)
        before, chosen = logits.clone(), torch.randperm(rows + 3, generator=gen)[:rows]
        import tandem.worker.grammar_mask as gm
        gm._CHUNK_ELEMENTS, saved = chunk, gm._CHUNK_ELEMENTS
        try:
            apply_grammar_mask(logits, chosen, bitmask)
        finally:
            gm._CHUNK_ELEMENTS = saved
        expected = before.clone()
        for i, r in enumerate(chosen.tolist()):
            expected[r][~torch.from_numpy(want[i])] = float("-inf")
        assert torch.equal(logits, expected)


# --- through the engine ----------------------------------------------------------------------------------
def test_outputs_are_accepted_greedy_and_sampled(llm):
    rng = random.Random(5)
    specs = [random_spec(rng) for _ in range(40)] + [S(grammar=g) for g in GRAMMARS]
    params = [_params(spec, seed=i, temperature=0.0 if i % 2 else 1.0) for i, spec in enumerate(specs)]
    outs = llm.generate([[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in specs], params,
                        use_tqdm=False)
    for spec, out in zip(specs, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.token_ids[-1] == BYTE_EOS, (spec, c)
        assert accepts(spec, c.text), (spec, c.text)


def test_any_json_object_and_unbounded_specs_are_prefixes_when_cut(llm):
    from tandem.engine.structured.compiler import parse

    specs = [S(json_object=True), S(json_object=True, disable_any_whitespace=True), S(regex="[a-c ]*z")]
    outs = llm.generate(["{"] * 6, [_params(specs[i % 3], seed=i, max_tokens=24) for i in range(6)], use_tqdm=False)
    for i, out in enumerate(outs):
        c, spec = out.outputs[0], specs[i % 3]
        if c.finish_reason == "stop":
            assert accepts(spec, c.text), c.text
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 24
        parse(spec)  # (a well-formed spec)


def test_logprobs_describe_the_masked_distribution(llm):
    spec = S(choice=["yes", "no"])
    out = llm.generate(["?"], _params(spec, seed=3, logprobs=5), use_tqdm=False)[0].outputs[0]
    first = out.logprobs[0]
    finite = {t: lp.logprob for t, lp in first.items() if lp.logprob > float("-inf")}
    assert set(finite) == {ord("y"), ord("n")}  # the only tokens the grammar allows first
    assert abs(sum(np.exp(v) for v in finite.values()) - 1.0) < 1e-5
    assert out.text in spec.choice


def test_a_complete_grammar_ends_the_request_also_with_ignore_eos(llm):
    outs = llm.generate(["a", "b", "c"], [_params(S(choice=["one", "two"]), seed=i, ignore_eos=True) for i in range(3)],
                        use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop" and c.text in ("one", "two") and c.token_ids[-1] == BYTE_EOS


def test_n_samples_each_follow_the_grammar(llm):
    spec = S(regex="(red|green|blue)-[0-9]{2}")
    out = llm.generate(["colour: "], _params(spec, seed=7, n=6), use_tqdm=False)[0]
    assert len(out.outputs) == 6 and len({c.text for c in out.outputs}) > 1
    assert all(accepts(spec, c.text) for c in out.outputs)


def test_preemption_keeps_every_matcher_exact():
    """A KV cache of 96 tokens for 12 constrained requests: they are preempted and recomputed, and
    their outputs still follow their grammars and equal those of a roomy cache."""
    rng = random.Random(11)
    specs = [spec for spec in (random_spec(rng) for _ in range(40)) if spec.kind != "json"][:11]
    specs.append(S(json={"type": "object", "properties": {"k": {"enum": [1, 22, 333]}}, "required": ["k"]}))
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 20))] for _ in specs]
    params = [_params(spec, seed=i, max_tokens=64) for i, spec in enumerate(specs)]
    results = []
    for kv in (96, 8192):
        engine = LLM(MODEL, dtype="float64", kv_cache_tokens=kv, block_size=8, max_num_seqs=8)
        outs = [o.outputs[0] for o in engine.generate(prompts, params, use_tqdm=False)]
        assert (engine.engine.core.scheduler.num_preemptions > 0) == (kv == 96)
        engine.engine.shutdown()
        assert all(c.finish_reason == "stop" and accepts(s, c.text) for s, c in zip(specs, outs))
        results.append([c.token_ids for c in outs])
    assert results[0] == results[1]


@contextlib.contextmanager
def _slow_compiles(engine):
    """Every compilation waits for the event this yields (at most 30 s)."""
    compiler = engine.core.grammars.compiler
    gate, real = threading.Event(), compiler.compile_spec
    compiler.compile_spec = lambda c, spec: (gate.wait(30), real(c, spec))[1]
    try:
        yield gate
    finally:
        gate.set()
        compiler.compile_spec = real


def test_a_slow_compile_never_blocks_other_requests(llm):
    engine = llm.engine
    with _slow_compiles(engine) as gate:
        engine.add_request("slow", None, _params(S(regex="slow[0-9]{3}"), seed=1), prompt_token_ids=[1, 2])
        engine.add_request("free", None, SamplingParams(max_tokens=8, ignore_eos=True), prompt_token_ids=[3, 4])
        finished = {}
        for _ in range(200):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
            if "free" in finished:
                break
        assert "free" in finished and "slow" not in finished and "slow" in engine.core.grammars.held
        gate.set()
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert accepts(S(regex="slow[0-9]{3}"), finished["slow"].outputs[0].text)


def test_a_grammar_that_fails_to_compile_fails_its_request_and_the_engine_goes_on(llm):
    compiler = llm.engine.core.grammars.compiler
    real = compiler.compile_spec

    def failing(c, spec):
        raise ValueError("SamplingParams.structured_outputs.regex cannot be compiled: too large")

    compiler.compile_spec = failing
    try:
        with pytest.raises(ValueError, match="cannot be compiled: too large"):
            llm.generate(["x"], _params(S(regex="never[0-9]"), seed=1), use_tqdm=False)
    finally:
        compiler.compile_spec = real
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["x"], _params(S(regex="after[0-9]"), seed=1), use_tqdm=False)[0].outputs[0]
    assert accepts(S(regex="after[0-9]"), out.text)


def test_an_abort_while_compiling_or_running_ends_the_request(llm):
    engine = llm.engine
    with _slow_compiles(engine) as gate:
        engine.add_request("held", None, _params(S(regex="held[a-z]{50}"), seed=1), prompt_token_ids=[1])
        engine.add_request("run", None, _params(S(regex="[a-z]{100}"), seed=1), prompt_token_ids=[1])
        for _ in range(3):
            engine.step()
        assert engine.abort_request("held") is not None and "held" not in engine.core.grammars.held
        gate.set()
        for _ in range(6):
            engine.step()
        assert engine.abort_request("run").outputs[0].finish_reason == "abort"
        while engine.has_unfinished_requests():
            engine.step()


@pytest.mark.parametrize("async_batching", [False, True])
def test_a_failed_step_between_submit_and_mask_leaves_the_llm_usable(async_batching):
    """The step loop raises after submitting a constrained step, before its mask: the device must
    not wait forever for it (``drain``), and the LLM serves the next call."""
    llm = LLM(MODEL, dtype="float32", async_batching=async_batching)
    scheduler = llm.engine.core.scheduler
    real, calls = scheduler.update, []

    def update(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(*args)

    scheduler.update = update
    spec = S(regex="[a-z]{10,20}")
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(["a", "b"], _params(spec, seed=2), use_tqdm=False)
    scheduler.update = real
    outs = llm.generate(["a", "b"], _params(spec, seed=2), use_tqdm=False)
    assert all(accepts(spec, o.outputs[0].text) for o in outs)
    llm.engine.shutdown()


def test_a_checkpoint_with_a_real_tokenizer(checkpoint_dir):
    schema = {"type": "object", "properties": {"name": {"enum": ["Alice", "Bob"]},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    specs = [S(json=schema, disable_any_whitespace=True), S(regex=r"The (cat|dog) sat on the [a-z]{2,8}\."),
             S(choice=["sunny", "rain", "Hello, how are you?"]), S(grammar=list(GRAMMARS)[1])]
    llm = LLM(str(checkpoint_dir("llama")), dtype="float32")
    outs = llm.generate(["Once upon a time"] * 8, [_params(specs[i % 4], seed=i, temperature=i % 2 * 1.0)
                                                     for i in range(8)], use_tqdm=False)
    llm.engine.shutdown()
    for i, out in enumerate(outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and accepts(specs[i % 4], c.text), (specs[i % 4], c)


def test_host_only_bench_with_json_masks():
    from tandem.bench.host_only import measure

    plain = measure(MODEL, 8, 8, 48)
    masked = measure(MODEL, 8, 8, 48, {"structured_output": "json"})
    assert masked.steps > 0 and masked.mask_ms > 0 and plain.mask_ms == 0


_STREAMS = """
import sys
sys.path.insert(0, "tests")
import cuda_stub
cuda_stub.install()
import differential
from differential import compare, make_case, run_case, with_constraints
from tandem.worker.stream_executor import StreamExecutor

calls = []
real_provide, real_create = StreamExecutor.provide_mask, differential.create_engine
StreamExecutor.provide_mask = lambda self, step_id, mask: (calls.append(step_id), real_provide(self, step_id, mask))
in_place, real_buffer = [], StreamExecutor.mask_buffer  # the host fills the pinned rows themselves
StreamExecutor.mask_buffer = lambda self, *a: (lambda b: (in_place.append(b is not None), b)[1])(real_buffer(self, *a))
for seed in (301, 302, 303):
    case = with_constraints(make_case(seed), 1.0)
    differential.create_engine = real_create
    reference = run_case(case, True)  # the thread executor's outputs
    differential.create_engine = lambda config: cuda_stub.with_stream_executor(real_create(config))
    for async_batching in (False, True):
        problems = compare(case, reference, run_case(case, async_batching), names=("thread", "streams"))
        assert not problems, case.describe() + "\\n".join(problems)
assert len(calls) > 20 and len(in_place) == len(calls) and all(in_place), (calls, in_place)
print("ok", len(calls))
"""


def test_the_cuda_executor_path_with_masks_on_cpu_stubs():
    """``StreamExecutor`` (the CUDA executor) with its streams and events stubbed out on a CPU: its
    two-part submission of constrained steps gives the thread executor's outputs, sync and async."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _STREAMS], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]


def test_the_memory_plan_reserves_the_largest_mask_a_step_carries():
    from tandem.engine.structured.manager import StructuredOutputs
    from tandem.worker.memory import grammar_mask_bytes

    manager = StructuredOutputs("random:tiny", frozenset({257}))  # 512 tokens: 16 int32 words a row
    try:
        assert grammar_mask_bytes(7, 512) == 7 * manager.words * np.dtype(np.int32).itemsize == 7 * 16 * 4
    finally:
        manager.shutdown()
