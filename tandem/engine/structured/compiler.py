"""Grammars from ``StructuredOutputsParams``, compiled with xgrammar off the step loop.

``parse`` turns a spec into xgrammar's ``Grammar`` without the vocabulary: the InputProcessor runs
it to refuse a bad spec up front (``ValueError`` naming the field and xgrammar's reason). The
``GrammarCompiler`` compiles parsed grammars against the model's vocabulary in a small thread pool
(xgrammar releases the GIL while it compiles, so the step loop keeps running), keeping one future
per spec in an LRU cache: requests with the same spec (the ``n`` samples of a prompt, a server's
repeated schema) share one compilation, and a spec that failed fails again at once.

xgrammar (which imports torch) is imported only here and only when a spec is first parsed, so an
engine that never sees a constrained request never loads it."""
from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tandem.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

_ANY_OBJECT = '{"type": "object"}'
# xgrammar's messages start with a time stamp and a C++ source location, which say nothing to a user
_NOISE = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*|Check failed: \(.*?\) is false:\s*")


_PARSED: OrderedDict[tuple, None] = OrderedDict()  # specs that parsed (a server sees the same schema often)
_PARSED_LOCK = threading.Lock()  # a server may check requests on several threads


def check_request(spec: StructuredOutputsParams, has_tokenizer: bool) -> None:
    """What the InputProcessor refuses up front (``ValueError``), before anything runs."""
    if not has_tokenizer:
        raise ValueError("SamplingParams.structured_outputs needs a model with a tokenizer (its vocabulary)")
    key = spec.key()
    with _PARSED_LOCK:
        if key in _PARSED:  # a JSON schema takes about a millisecond to parse
            _PARSED.move_to_end(key)
            return
    parse(spec)
    with _PARSED_LOCK:
        _PARSED[key] = None
        if len(_PARSED) > 256:
            _PARSED.popitem(last=False)


def parse(spec: StructuredOutputsParams) -> xgrammar.Grammar:
    """The spec's grammar (no vocabulary needed); ValueError naming the field if it is not valid."""
    import xgrammar as xgr

    kind, value = spec.kind, spec.value
    if kind == "json" and isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as exc:
            raise ValueError(f"SamplingParams.structured_outputs.json is not valid JSON: {exc}") from None
    with _named(kind, "is not valid"):
        if kind in ("json", "json_object"):
            text, options = _schema(spec)
            return xgr.Grammar.from_json_schema(text, **options)
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(_text(value))
        return xgr.Grammar.from_ebnf(_ebnf(spec))


def _text(value: dict[str, Any] | str) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _schema(spec: StructuredOutputsParams) -> tuple[str, dict[str, bool]]:
    """The schema's text and xgrammar's options for it."""
    options = {"any_whitespace": not spec.disable_any_whitespace, "strict_mode": spec.kind == "json"}
    if spec.kind == "json_object":  # not strict: an object with any properties
        return _ANY_OBJECT, options
    return _text(spec.json), options


def _ebnf(spec: StructuredOutputsParams) -> str:
    if spec.kind == "choice":  # JSON's string escapes are a subset of the EBNF literals' (\" \\ \n \uXXXX)
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
    return spec.grammar


@contextlib.contextmanager
def _named(kind: str, what: str) -> Iterator[None]:
    """xgrammar's errors (RuntimeError, with C++ noise) as a ValueError naming the field."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"SamplingParams.structured_outputs.{kind} {what}: {clean_message(exc)}") from None


def clean_message(exc: BaseException) -> str:
    lines = [_NOISE.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


class GrammarCompiler:
    """Compiles specs on ``threads`` background threads; ``compile`` never blocks."""

    def __init__(self, tokenizer_info: Callable[[], xgrammar.TokenizerInfo], threads: int = 2,
                 cache_size: int = 256) -> None:
        self._tokenizer_info = tokenizer_info  # called once, on a compile thread (a large vocabulary takes a while)
        self._compiler: Any = None
        self._info: Any = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tandem-grammar")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._cache_size = cache_size
        self.compile_spec = compile_spec  # what a thread runs (tests replace it to fake a slow compile)

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """A future of the spec's ``xgrammar.CompiledGrammar`` (its exception: a ValueError to show)."""
        key = spec.key()
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._run, spec)
        self._cache[key] = future
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)  # its requests keep their own reference
        return future

    def tokenizer_info(self) -> xgrammar.TokenizerInfo:
        """The vocabulary the grammars are compiled against (made once, by the first caller)."""
        with self._lock:
            if self._info is None:
                self._info = self._tokenizer_info()
            return self._info

    def _run(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        info = self.tokenizer_info()
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self.compile_spec(self._compiler, spec)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def compile_spec(compiler: xgrammar.GrammarCompiler, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
    """From the spec's own text, not from a parsed ``Grammar``: xgrammar 0.2.9 reprints a ``Grammar``
    to compile it, and reads a literal's non-ASCII character followed by a hex digit back as one
    escape ("\\xfc" "b" -> U+FCB.), so ``compile_grammar(parse(spec))`` allowed wrong bytes."""
    parse(spec)  # the same errors as the InputProcessor's check
    with _named(spec.kind, "cannot be compiled"):
        if spec.kind in ("json", "json_object"):
            text, options = _schema(spec)
            return compiler.compile_json_schema(text, **options)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.regex)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(_text(spec.structural_tag))
        return compiler.compile_grammar(_ebnf(spec))
