"""Random structured-output specs and the independent check of an output against its spec, for the
tests of the engine (and of the server: the same specs through the API).

Every spec drawn here is bounded: its language is finite, so a constrained output ends by its
grammar (EOS is the only token left) within ``MAX_TOKENS`` tokens of at least one byte each.
Strings are bounded by ``pattern`` rather than ``maxLength`` (xgrammar's maxLength strings admit raw
control characters, which strict JSON refuses). ``accepts`` checks with the standard tools, not with
xgrammar: ``json.loads`` + ``jsonschema``, ``re.fullmatch``, list membership, and for the EBNF
grammars an equivalent Python regex written next to each."""
from __future__ import annotations

import json
import random
import re

import jsonschema

from tandem.structured_outputs import StructuredOutputsParams

MAX_TOKENS = 160  # more than any bounded spec here needs (JSON of at most ~120 bytes)

# EBNF grammar -> a Python regex with the same language
GRAMMARS = {
    'root ::= "(" num ("," num){0,2} ")" | "[" [a-z]{0,8} "]"\nnum ::= [0-9]{1,3}':
        r"\([0-9]{1,3}(,[0-9]{1,3}){0,2}\)|\[[a-z]{0,8}\]",
    'root ::= greeting " " name "!"\ngreeting ::= "hi" | "hello" | "hey"\nname ::= [A-Z] [a-z]{1,6}':
        r"(hi|hello|hey) [A-Z][a-z]{1,6}!",
    'root ::= item ("; " item){0,3}\nitem ::= [a-z]{1,3} "=" ("true" | "false" | [0-9]{1,2})':
        r"[a-z]{1,3}=(true|false|[0-9]{1,2})(; [a-z]{1,3}=(true|false|[0-9]{1,2})){0,3}",
}
_WORDS = ["alpha", "beta", "x", "yes", "no", "a b", "é", "naïve", 'quote"d', "back\\slash", "tab\tbed", "new\nline",
          "{}", "[1]", "über", "日本", "-", "."]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "boolean", "enum", "string", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([0, 9, 99, 999])}
    if kind == "enum":
        return {"enum": rng.sample(_WORDS, rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{1,4}$", "^[0-9]{2}-[0-9]{2}$", "^(on|off)$"])}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if kind == "object":
        names = rng.sample(["id", "name", "ok", "tags", "v", "ключ"], rng.randint(1, 3))
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": rng.sample(names, rng.randint(1, len(names))), "additionalProperties": False}
    return {"type": kind}


def random_regex(rng: random.Random) -> str:
    pieces = ["[a-z]{1,%d}" % rng.randint(1, 5), "[0-9]{%d}" % rng.randint(1, 3), "(foo|bar|baz)", "-",
              r"\.", "[A-F0-9]?", " ", "(ab|c){1,2}", "x?"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))


def random_spec(rng: random.Random) -> StructuredOutputsParams:
    kind = rng.choice(["json", "json", "regex", "choice", "grammar"])
    if kind == "json":
        top = {"type": "object", "properties": {"v": random_schema(rng)}, "required": ["v"],
               "additionalProperties": False} if rng.random() < 0.5 else random_schema(rng)
        return StructuredOutputsParams(json=top if rng.random() < 0.7 else json.dumps(top),
                                       disable_any_whitespace=True)
    if kind == "regex":
        return StructuredOutputsParams(regex=random_regex(rng))
    if kind == "choice":
        return StructuredOutputsParams(choice=rng.sample(_WORDS, rng.randint(1, 5)))
    return StructuredOutputsParams(grammar=rng.choice(list(GRAMMARS)))


def accepts(spec: StructuredOutputsParams, text: str) -> bool:
    """Whether ``text`` is in the spec's language, by the standard tools."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        try:
            value = json.loads(text)
        except ValueError:
            return False
        if kind == "json_object":
            return isinstance(value, dict)
        schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError:
            return False
        return True
    if kind == "regex":
        return re.fullmatch(spec.regex, text) is not None
    if kind == "choice":
        return text in spec.choice
    return re.fullmatch(GRAMMARS[spec.grammar], text) is not None
