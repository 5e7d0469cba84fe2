"""Output constraints as clients ask for them, and the one constraint a request gets.

Four ways in, one constraint out (at most one per request: two are a 400 naming both):
- OpenAI's ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}`` (any JSON
  object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` (that schema;
  the output follows it whatever ``strict`` says: constraining is all or nothing here);
- vLLM's ``structured_outputs``: exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``;
- vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``, with
  ``guided_decoding_backend`` accepted only as ``"xgrammar"`` or ``"auto"`` (xgrammar is the one).

A JSON schema, regex or grammar that xgrammar cannot parse is refused by the engine's
InputProcessor when the request's engine requests are built, before anything is queued: a 400
naming the field and xgrammar's reason."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from tandem.server.errors import APIError
from tandem.server.protocol_types import STRICT, NonEmptyStr, OnlyFalse, refused_any
from tandem.structured_outputs import StructuredOutputsParams

JsonSchema = dict[str, Any] | str  # a schema, or its JSON text
Choices = Annotated[list[NonEmptyStr], Field(min_length=1)]


class JsonSchemaSpec(BaseModel):
    model_config = STRICT
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # absent: any JSON value
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class StructuralTagFormat(BaseModel):
    """vLLM's: xgrammar's structural tag in its current shape (``format``) or its older one
    (``structures`` of begin / schema / end, and ``triggers``)."""

    model_config = STRICT
    type: Literal["structural_tag"]
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat | StructuralTagFormat,
                           Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` object."""

    model_config = STRICT
    json_: JsonSchema | None = Field(None, alias="json")
    regex: NonEmptyStr | None = None
    choice: Choices | None = None
    grammar: NonEmptyStr | None = None
    json_object: bool | None = None
    # xgrammar's defaults are the only behaviour: other values are refused
    disable_fallback: OnlyFalse | None = None
    disable_any_whitespace: bool | None = None  # JSON with fixed separators, no free whitespace
    disable_additional_properties: OnlyFalse | None = None
    whitespace_pattern: Annotated[None, refused_any()] = None
    structural_tag: JsonSchema | None = None  # xgrammar's structural tag (or its text)


class GuidedFields(BaseModel):
    """Output constraints as request fields: vLLM's current object and its older flat fields."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | None = None
    guided_regex: NonEmptyStr | None = None
    guided_choice: Choices | None = None
    guided_grammar: NonEmptyStr | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None
    guided_whitespace_pattern: Annotated[None, refused_any()] = None
    structural_tag: JsonSchema | None = None  # vLLM's older field: the structural tag's JSON text
    response_format: ResponseFormat | None = None


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json" | "json_object" | "regex" | "grammar" | "choice" | "structural_tag" (the engine's names)
    value: Any  # a schema (dict or JSON text), True, a pattern, a grammar, a list of choices
    field: str  # the request field that asked for it (errors name it)
    disable_any_whitespace: bool = False

    @property
    def param(self) -> str:
        """The top-level request field (an error's ``param``)."""
        return self.field.split(".")[0]

    @property
    def size(self) -> int:
        """Characters to parse (the measure ``Offload.run`` takes)."""
        return len(self.value if isinstance(self.value, str) else json.dumps(self.value))


def requested_constraint(body: GuidedFields) -> Constraint | None:
    """The request's constraint, or None; two or more are a 400 naming them."""
    found = [*_from_response_format(body.response_format), *_from_structured(body.structured_outputs),
             *(Constraint(kind, value, f"guided_{kind}") for kind, value in (
                 ("json", body.guided_json), ("regex", body.guided_regex), ("choice", body.guided_choice),
                 ("grammar", body.guided_grammar)) if value is not None),
             *([] if body.structural_tag is None else [Constraint("structural_tag", structural_tag(
                 body.structural_tag, "structural_tag"), "structural_tag")])]
    if len(found) > 1:
        names = " and ".join(c.field for c in found)
        raise APIError(400, f"{names} each ask for an output constraint; a request may have one", found[0].param)
    return found[0] if found else None


def _from_response_format(fmt: Any) -> list[Constraint]:
    if isinstance(fmt, JsonObjectFormat):
        return [Constraint("json_object", True, "response_format")]
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema_
        return [Constraint("json", {} if schema is None else schema, "response_format")]
    if isinstance(fmt, StructuralTagFormat):
        return [Constraint("structural_tag", structural_tag(fmt.model_dump(exclude_none=True), "response_format"),
                           "response_format")]
    return []


def structural_tag(value: dict[str, Any] | str, field: str) -> dict[str, Any]:
    """xgrammar's current structural tag from either shape vLLM takes (its JSON text too)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise APIError(400, f"{field} is not valid JSON: {exc}", field.split(".")[0]) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{field} must be a JSON object (a structural tag)", field.split(".")[0])
    if "structures" not in value:
        return value
    tags = [{"type": "tag", "begin": s.get("begin"), "end": s.get("end"),
             "content": {"type": "json_schema", "json_schema": s.get("schema", True)}} for s in value["structures"]]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": value.get("triggers") or [],
                                                 "tags": tags}}


def _from_structured(so: StructuredOutputs | None) -> list[Constraint]:
    if so is None:
        return []
    tag = None if so.structural_tag is None else structural_tag(so.structural_tag, "structured_outputs.structural_tag")
    kinds = (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar),
             ("structural_tag", tag), ("json_object", True if so.json_object else None))
    found = [Constraint(kind, value, f"structured_outputs.{kind}", bool(so.disable_any_whitespace))
             for kind, value in kinds if value is not None]
    if not found and so.disable_any_whitespace:  # an option with no constraint to apply it to
        raise APIError(400, "structured_outputs sets disable_any_whitespace but no constraint: give one of json, "
                            "regex, choice, grammar or json_object: true", "structured_outputs")
    return found


def engine_kwargs(constraint: Constraint) -> dict[str, Any]:
    """The SamplingParams keywords that carry the constraint to the engine (whose InputProcessor
    parses it with xgrammar: a bad schema, regex or grammar is refused there, before anything is
    queued, and ``Serving`` names this constraint's field in the 400)."""
    try:
        spec = StructuredOutputsParams(**{constraint.kind: constraint.value},
                                       disable_any_whitespace=constraint.disable_any_whitespace)
    except ValueError as exc:
        raise APIError(400, f"{constraint.field}: {exc}", constraint.param) from exc
    return {"structured_outputs": spec}
