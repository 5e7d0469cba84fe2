"""Randomized differential cases (sync vs async; prefix caching on vs off), shared by the CPU tests
and the GPU check script.

A case is a seeded script: engine settings (tiny KV caches force preemption, small token budgets
force chunked prefill) and requests that arrive at given steps, some aborted at a later step, with
greedy or seeded sampling, stop strings, stop token ids and EOS ending them at different steps.
``with_shared_prefixes`` makes most prompts start with one of two shared prefixes, and some repeat
an earlier prompt whole. ``with_constraints`` (part of every case) gives some requests structured
output (a JSON schema, a regex, a choice, an EBNF grammar or any JSON object), some of them as the
n > 1 samples of one prompt. ``with_speculation`` (part of every case too) turns speculative decoding on
in some cases."""
from __future__ import annotations

import dataclasses
import random
import string
from dataclasses import dataclass, field

import torch

from tandem.config import EngineConfig
from tandem.engine.core import CoreStats
from tandem.engine.fanout import child_seed
from tandem.llm import create_engine
from tandem.sampling_params import SamplingParams, StructuredOutputsParams

MODEL = "random:tiny"
VOCAB = 512


@dataclass
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int
    abort_at: int | None


@dataclass
class Case:
    seed: int
    engine: dict
    requests: list[Request] = field(default_factory=list)
    model: str = MODEL  # a preset over the byte tokenizer's VOCAB

    def describe(self) -> str:
        reqs = "\n".join(f"  {r.rid}: prompt_len={len(r.prompt)} arrive={r.arrive} abort_at={r.abort_at} "
                         f"{r.params}" for r in self.requests)
        return f"case seed={self.seed} model={self.model} engine={self.engine}\n{reqs}"


def _params(rng: random.Random) -> SamplingParams:
    greedy = rng.random() < 0.5
    max_tokens = rng.randint(1, 24)
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.5]),
        top_k=0 if greedy else rng.choice([0, 0, 5, 50]),
        top_p=1.0 if greedy else rng.choice([1.0, 0.9, 0.5]),
        min_p=0.0 if greedy else rng.choice([0.0, 0.0, 0.1]),
        seed=rng.randrange(2**31),
        max_tokens=max_tokens,
        min_tokens=rng.choice([0, 0, 0, rng.randint(0, max_tokens)]),
        stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 10, 30])),
        stop=rng.sample(string.ascii_letters + string.digits, rng.choice([0, 0, 8])) or None,
        ignore_eos=rng.random() < 0.3,
        presence_penalty=rng.choice([0.0, 0.0, 0.8, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.6]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        logit_bias={t: rng.choice([-100.0, -3.0, 2.0, 5.0]) for t in rng.sample(range(VOCAB), rng.choice([0, 0, 3]))},
        logprobs=rng.choice([None, None, 0, 3]),
        prompt_logprobs=rng.choice([None, None, None, 2]),
    )


def make_case(seed: int, model: str = MODEL, constrained: float = 0.3) -> Case:
    """``constrained``: the share of requests with structured output (``with_constraints``)."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 8, 16])
    engine = {"kv_cache_tokens": rng.choice([64, 96, 160, 1024]), "block_size": block_size,
              "max_num_batched_tokens": rng.choice([8, 16, 32, 256]), "max_num_seqs": rng.choice([2, 4, 8])}
    case = Case(seed, engine, model=model)
    for i in range(rng.randint(1, 8)):
        arrive = rng.choice([0, 0, rng.randint(0, 12)])
        abort_at = arrive + rng.randint(0, 15) if rng.random() < 0.15 else None
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
        case.requests.append(Request(f"r{i}", prompt, _params(rng), arrive, abort_at))
    return with_speculation(with_constraints(case, constrained))


def speculative_config(rng: random.Random) -> dict:
    """A random speculative decoding setting: n-gram lookup with k and the n-gram sizes drawn, or (a
    third of them) a draft model, the target itself (every proposal accepted) or one of another
    family (nearly every one rejected); and a batch-size limit that sometimes switches speculation
    off and on within a run."""
    high = rng.randint(1, 4)
    config = {"method": "ngram", "num_speculative_tokens": rng.randint(1, 4), "prompt_lookup_max": high,
              "prompt_lookup_min": rng.randint(1, high), "disable_by_batch_size": rng.choice([2, 4, 32])}
    if rng.random() < 1 / 3:
        del config["prompt_lookup_max"], config["prompt_lookup_min"]
        config.update(method="draft", model=rng.choice([MODEL, "random:tiny-gemma2"]))
    return config


def with_speculation(case: Case, share: float = 0.25) -> Case:
    """The same case (its own random stream is untouched) with speculative decoding on, with about
    ``share`` probability."""
    rng = random.Random(f"spec-{case.seed}")
    if rng.random() < share:
        config = speculative_config(rng)
        if config.get("model") is not None and case.model != MODEL:
            config["model"] = case.model  # another model's vocabulary: the target drafts for itself
        case.engine["speculative_config"] = config
    return case


# over the byte tokenizer: bounded ones end by their grammar, the others run to max_tokens
_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 300},
                                            "ok": {"type": "boolean"}, "tag": {"enum": ["a", "bc", "d e"]}},
           "required": ["n", "ok"], "additionalProperties": False}
SPECS = (
    StructuredOutputsParams(choice=["yes", "no", "maybe", "n/a"]),
    StructuredOutputsParams(regex=r"[a-z]{1,5}( [a-z]{1,5}){0,3}\."),
    StructuredOutputsParams(regex=r"[0-9a-f ]*"),
    StructuredOutputsParams(json=_SCHEMA),
    StructuredOutputsParams(json=_SCHEMA, disable_any_whitespace=True),
    StructuredOutputsParams(grammar='root ::= "(" num ("," num){0,2} ")" | "[" [a-z]* "]"\nnum ::= [0-9]{1,3}'),
    StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
)


def with_constraints(case: Case, share: float = 0.3) -> Case:
    """The same case (its own random stream is untouched) with about ``share`` of its requests
    constrained by one of ``SPECS``, a third of those with one or two more samples of the same
    prompt (as ``n`` > 1 fans out: seeds seed + i)."""
    rng = random.Random(f"grammar-{case.seed}")
    siblings = []
    for r in list(case.requests):
        if rng.random() < 0.2:  # bad words of several tokens: the host mask without a grammar
            r.params = dataclasses.replace(r.params, bad_words_token_ids=[  # byte ids: in every test vocabulary
                [rng.randrange(256) for _ in range(rng.randint(2, 3))] for _ in range(rng.randint(1, 4))])
        if rng.random() >= share or r.params.structured_outputs is not None:
            continue
        spec = rng.choice(SPECS)
        if rng.random() < 0.25:  # the grammar after a reasoning that ends with one of a few letters
            spec = dataclasses.replace(spec, reasoning_end=rng.choice("aeiou"))
        r.params = dataclasses.replace(r.params, min_tokens=0, structured_outputs=spec)
        for j in range(1, 1 + (rng.randint(1, 2) if rng.random() < 0.33 else 0)):
            params = dataclasses.replace(r.params, seed=child_seed(r.params.seed, j))
            siblings.append(Request(f"{r.rid}-{j}", list(r.prompt), params, r.arrive, r.abort_at))
    case.requests += siblings
    return case


def with_shared_prefixes(case: Case) -> Case:
    """The same case (its own random stream is untouched) with prompts that share prefixes, each
    short enough to fit the case's KV cache with room to generate."""
    rng = random.Random(f"prefix-{case.seed}")
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 48))] for _ in range(2)]
    longest = case.engine["kv_cache_tokens"] - 8
    for i, r in enumerate(case.requests):
        roll = rng.random()
        if i and roll < 0.2:
            r.prompt = list(case.requests[rng.randrange(i)].prompt)
        elif roll < 0.8:
            r.prompt = (rng.choice(prefixes) + r.prompt)[:longest]
        if len(r.prompt) + r.params.max_tokens > case.engine["kv_cache_tokens"]:
            r.params.max_tokens = None  # the rest of the context (more is refused): it ends at max_model_len
    return case


@dataclass
class Outcome:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list | None = None  # per token: [(token, logprob, rank), ...] sorted, when asked for
    prompt_logprobs: list | None = None

    @classmethod
    def of(cls, out, reason: str | None = None) -> "Outcome":
        c = out.outputs[0]
        return cls(c.token_ids, c.text, reason or c.finish_reason, _flat(c.logprobs), _flat(out.prompt_logprobs))

    def matches(self, other: "Outcome", logprob_atol: float = 0.0) -> bool:
        """Equal, except that logprob values may differ by ``logprob_atol`` (runs whose float32
        math takes other shapes: the same tokens, logits a rounding apart)."""
        if logprob_atol == 0.0 or self == other:
            return self == other
        if (self.token_ids, self.text, self.finish_reason) != (other.token_ids, other.text, other.finish_reason):
            return False
        return all(_entries_close(a, b, logprob_atol) for a, b in ((self.logprobs, other.logprobs),
                                                                   (self.prompt_logprobs, other.prompt_logprobs)))


def _entries_close(a: list | None, b: list | None, atol: float) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for ea, eb in zip(a, b):
        if (ea is None) != (eb is None):
            return False
        if ea is not None and ([(t, r) for t, _, r in ea] != [(t, r) for t, _, r in eb]
                               or any(abs(x - y) > atol for (_, x, _), (_, y, _) in zip(ea, eb))):
            return False
    return True


def _flat(entries: list | None) -> list | None:
    if entries is None:
        return None
    return [None if e is None else sorted((t, lp.logprob, lp.rank) for t, lp in e.items()) for e in entries]


def run_case(case: Case, async_batching: bool, device: str = "cpu", dtype: str = "float64",
             cuda_graphs: bool = False, prefix_caching: bool = True) -> dict[str, Outcome]:
    return run_case_with_stats(case, async_batching, device, dtype, cuda_graphs, prefix_caching)[0]


def run_case_with_stats(case: Case, async_batching: bool, device: str = "cpu", dtype: str = "float64",
                        cuda_graphs: bool = False, prefix_caching: bool = True) -> tuple[dict[str, Outcome], CoreStats]:
    config = EngineConfig(model=case.model, device=device, dtype=dtype, async_batching=async_batching,
                          enforce_eager=not cuda_graphs, seed=case.seed, enable_prefix_caching=prefix_caching,
                          **case.engine)
    engine = create_engine(config)
    results = drive_case(engine, case)
    stats = engine.core.stats()
    engine.shutdown()
    return results, stats


def drive_case(engine, case: Case) -> dict[str, Outcome]:
    """The case's requests through an engine (``LLMEngine``), as they arrive and are aborted."""
    for spec in {r.params.structured_outputs.key(): r.params.structured_outputs for r in case.requests
                 if r.params.structured_outputs is not None}.values():
        # compiled before the run: a request joins the queue when it arrives, in both runs alike
        engine.core.grammars.compiler.compile(spec).result()
    if any(r.params.structured_outputs is not None for r in case.requests):
        engine.core.grammars.wait_for_workers()  # (grammar worker processes, if any: one is ready)
    results: dict[str, Outcome] = {}
    pending = sorted(case.requests, key=lambda r: r.arrive)
    step = 0
    while pending or engine.has_unfinished_requests() or any(r.abort_at and r.abort_at >= step for r in case.requests
                                                             if r.rid not in results):
        for r in [r for r in pending if r.arrive <= step]:
            engine.add_request(r.rid, None, r.params, prompt_token_ids=r.prompt)
            pending.remove(r)
        for r in case.requests:
            if r.abort_at == step and r.rid not in results:
                out = engine.abort_request(r.rid)
                if out is not None:
                    results[r.rid] = Outcome.of(out, "abort")
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                results[out.request_id] = Outcome.of(out)
        step += 1
        if step > 10_000:
            raise AssertionError("engine made no progress")
    return results


def compare(case: Case, sync: dict[str, Outcome], asyn: dict[str, Outcome], names: tuple[str, str] = ("sync", "async"),
            aborts_may_differ: bool = False, logprob_atol: float = 0.0) -> list[str]:
    """Differences, which are bugs. Sync and async make the same decisions at the same loop steps, so
    every request (aborted ones too) must end identically. Runs that schedule differently (prefix
    caching on vs off) get ``aborts_may_differ``: an abort at a given loop step may cut a request at
    another length, so where either run aborted it, the shorter output must begin the longer."""
    problems = []
    for r in case.requests:
        s, a = sync.get(r.rid), asyn.get(r.rid)
        if s is None or a is None:
            problems.append(f"{r.rid}: no final output ({names[0]}={s}, {names[1]}={a})")
        elif not s.matches(a, logprob_atol) and not (aborts_may_differ and _cut_short_by_abort(s, a)):
            problems.append(f"{r.rid}: {names[0]} {s} vs {names[1]} {a}")
    return problems


def _cut_short_by_abort(x: Outcome, y: Outcome) -> bool:
    if "abort" not in (x.finish_reason, y.finish_reason):
        return False
    short, long = sorted((x.token_ids, y.token_ids), key=len)
    return long[:len(short)] == short
