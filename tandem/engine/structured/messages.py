"""What the engine and its grammar worker processes (``workers``, ``grammar_worker``) say to each
other: msgspec structs, array-like (no field names in a frame), over one socket pair per worker.
A step's message carries only ids and token ids; the mask rows go through shared memory
(``shared_mask``)."""
from __future__ import annotations

import msgspec

from tandem.engine.structured.rules import RulesSpec


class Setup(msgspec.Struct, array_like=True):
    """The first message: the vocabulary (xgrammar's serialized ``TokenizerInfo``) and the mask's layout."""

    tokenizer_info: str
    words: int  # int32 words per mask row
    rows: int  # rows per slot of the shared mask
    stop_ids: list[int]  # the matchers' stop tokens


class Ready(msgspec.Struct, array_like=True):
    pid: int


class Add(msgspec.Struct, array_like=True):
    """A request's rules, under a handle the engine chose (never reused)."""

    handle: int
    grammar: int  # a grammar id of ``Step.grammars`` (this step's or an earlier one's); -1: no grammar
    rules: RulesSpec


class Step(msgspec.Struct, array_like=True):
    """One step's work for one worker, in this order: forget and learn grammars, add and drop
    requests, advance requests by their new tokens, fill mask rows into slot ``slot``."""

    grammars: list[tuple[int, str]]  # (grammar id, xgrammar's serialized CompiledGrammar) new to this worker
    forget: list[int]  # grammar ids no request added later uses
    adds: list[Add]
    drops: list[int]  # handles
    adv_handles: list[int]
    adv_counts: list[int]  # new tokens of each, taken in order from adv_tokens
    adv_tokens: list[int]
    fill_handles: list[int]
    fill_rows: list[int]
    fill_gen: list[int]  # the output index each row samples
    fill_ahead: list[list[int]]  # the proposals before each row in its step (``stepping.fill``)
    slot: int


class Done(msgspec.Struct, array_like=True):
    """A step's outcome: only the entries that were not plainly accepted / filled."""

    advanced: list[tuple[int, int, int, int]]  # (entry, stepping outcome, rejected token, its output index)
    filled: list[tuple[int, int, int]]  # (entry, stepping problem, tokens seen)
    error: str = ""  # the worker failed (a Python exception): it exits after sending this
    seconds: float = 0.0  # the worker's time on the step (for measurements)
