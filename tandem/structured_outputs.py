"""What a request's output must match: ``SamplingParams(structured_outputs=StructuredOutputsParams(...))``,
vLLM's shape. Plain data, checked on construction (``ValueError`` naming the field).

Set exactly one kind:

- ``json``: a JSON schema, as a dict or as its JSON text; the output is one JSON value the schema
  accepts (xgrammar's strict mode: no properties or items the schema does not list).
- ``regex``: the whole output matches this regular expression.
- ``choice``: the output is exactly one of these (non-empty) strings.
- ``grammar``: an EBNF grammar in xgrammar's dialect (GBNF-like: ``name ::= ...`` rules, string
  literals, character classes, ``* + ? {m,n}``; the start rule is ``root``).
- ``json_object=True``: any JSON object.
- ``structural_tag``: xgrammar's structural tag (a dict, or its JSON text): free text with tagged
  regions that follow their own formats, e.g. tool calls whose arguments follow their schemas once a
  trigger such as ``<tool_call>`` appears (``tandem serve`` builds these for ``strict`` tools).

``disable_any_whitespace`` (the JSON kinds): JSON is written with fixed separators (``", "`` and
``": "``) and no other whitespace, instead of allowing any whitespace between its tokens (a
model may otherwise pad with whitespace forever).

Reasoning models (``reasoning_end``, e.g. ``"</think>"``): the constraint applies to the output after
its reasoning. With ``reasoning_end`` alone the output starts inside the reasoning (the prompt
opened it) and is free text until the first ``reasoning_end``; with ``reasoning_start`` too (one
token, e.g. ``"<think>"``) the output may open its reasoning with that token as its first, and is
constrained from its start otherwise. ``tandem serve --reasoning-parser`` sets both from the prompt.

The engine enforces the constraint with a token mask at every sampled token: the output stops
early only at the end of the grammar (EOS is allowed only where the grammar may end, and a
grammar that is complete ends the request with finish reason ``"stop"``), or at ``max_tokens``
(finish reason ``"length"``: the text is then a prefix of an accepted one).
"""
from __future__ import annotations

import copy
import json as _json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "structural_tag", "json_object")


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    structural_tag: dict[str, Any] | str | None = None
    reasoning_start: str | None = None
    reasoning_end: str | None = None
    #: the reasoning tags as tokens (start, end), set by the engine's InputProcessor
    reasoning_ids: tuple[int | None, tuple[int, ...]] | None = field(default=None, init=False, repr=False,
                                                                      compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        chosen = [k for k in KINDS if self._is_set(k)]
        if len(chosen) != 1:
            what = "no kind" if not chosen else "several kinds (" + ", ".join(chosen) + ")"
            raise ValueError(f"SamplingParams.structured_outputs sets {what}: set exactly one of "
                             f"{', '.join(KINDS[:-1])} or json_object=True")

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        return value is True if kind == "json_object" else value is not None

    def _check_types(self) -> None:
        bad = None
        if self.json is not None and not (isinstance(self.json, dict) or (isinstance(self.json, str) and self.json)):
            bad = "json", "must be a JSON schema (a dict, or its JSON text)"
        elif self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            bad = "regex", "must be a non-empty string"
        elif self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar.strip()):
            bad = "grammar", "must be a non-empty string (an EBNF grammar)"
        elif self.choice is not None and not (isinstance(self.choice, (list, tuple)) and self.choice
                                              and all(isinstance(c, str) and c for c in self.choice)):
            bad = "choice", "must be a non-empty list of non-empty strings"
        elif self.structural_tag is not None and not (isinstance(self.structural_tag, dict) or (
                isinstance(self.structural_tag, str) and self.structural_tag)):
            bad = "structural_tag", "must be xgrammar's structural tag (a dict, or its JSON text)"
        elif self.json_object is not None and not isinstance(self.json_object, bool):
            bad = "json_object", "must be a bool"
        elif not isinstance(self.disable_any_whitespace, bool):
            bad = "disable_any_whitespace", "must be a bool"
        bad = bad or self._reasoning_problem()
        if bad is not None:
            raise ValueError(f"SamplingParams.structured_outputs.{bad[0]} {bad[1]}, got {getattr(self, bad[0])!r}")

    def _reasoning_problem(self) -> tuple[str, str] | None:
        for name in ("reasoning_start", "reasoning_end"):
            tag = getattr(self, name)
            if tag is not None and not (isinstance(tag, str) and tag):
                return name, "must be a non-empty string"
        if self.reasoning_start is not None and self.reasoning_end is None:
            return "reasoning_start", "needs reasoning_end"
        return None

    @property
    def kind(self) -> str:
        """Which kind is set: one of ``KINDS``."""
        return next(k for k in KINDS if self._is_set(k))

    @property
    def value(self) -> Any:
        """The kind's value (True for json_object)."""
        return getattr(self, self.kind)

    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar (the compile cache's key): the kind, its value as
        text (a dict schema with sorted keys), the whitespace rule."""
        value = self.value
        if isinstance(value, dict):
            text = _json.dumps(value, sort_keys=True)
        elif isinstance(value, list):
            text = _json.dumps(value)
        else:
            text = str(value)
        return self.kind, text, self.disable_any_whitespace

    def copied(self) -> StructuredOutputsParams:
        """A checked copy sharing no dict or list with this one."""
        return StructuredOutputsParams(copy.deepcopy(self.json), self.regex,
                                       list(self.choice) if isinstance(self.choice, (list, tuple)) else self.choice,
                                       self.grammar, self.json_object, self.disable_any_whitespace,
                                       copy.deepcopy(self.structural_tag), self.reasoning_start, self.reasoning_end)
