"""The building blocks of the request models (``tandem.server.protocol``): strict field types, the
``LIMIT_KEY`` marks that ``tandem.server.openapi`` fills with the served model's bounds, and the
schema rewrites that make the generated OpenAPI schema say what validation does.

A field the server knows but does not implement takes only its neutral value (``refused``): any
other value is a 400 naming the field, and the schema allows only the neutral value."""
from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field

from tandem.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS

INT64_MAX = 2**63 - 1  # what the step contract carries (top_k, min_tokens, stop token ids)
LIMIT_KEY = "x-tandem-limit"  # marks a schema node whose bound depends on the served model
STRICT = ConfigDict(extra="ignore", strict=True)
T = TypeVar("T")


def limit(name: str) -> dict[str, str]:
    return {LIMIT_KEY: name}


def refused(*neutral: Any) -> BeforeValidator:
    """A field we do not implement: only its neutral values pass (the field's type says which, to the
    schema). ``null`` never reaches this check: it means the default (``SamplingRequest``)."""

    def check(value: Any) -> Any:
        if not any(type(value) is type(n) and value == n for n in neutral):
            raise ValueError("not supported by this server")
        return value

    return BeforeValidator(check)


def refused_any() -> BeforeValidator:
    """A field whose only accepted value is ``null`` (its default)."""
    return refused()


# a boolean field that takes one value only (the schema's const says which)
OnlyFalse = Annotated[Literal[False], refused(False)]
OnlyTrue = Annotated[Literal[True], refused(True)]


def keys_as_property_names(schema: dict[str, Any]) -> None:
    """pydantic writes a dict's key pattern as ``patternProperties``, which lets other keys through;
    ``propertyNames`` says that every key must match, which is what validation does."""
    for branch in schema.get("anyOf", [schema]):
        if "patternProperties" in branch:
            ((pattern, values),) = branch.pop("patternProperties").items()
            branch["propertyNames"] = {"pattern": pattern, **limit("bias_token")}
            branch["additionalProperties"] = values


def null_means_default(schema: dict[str, Any]) -> None:
    """In the schema: every optional field also takes ``null`` (``SamplingRequest._drop_nulls``)."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        branches = prop.get("anyOf", [prop])
        if name in required or {"type": "null"} in branches:
            continue
        outer = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **outer}


def _integral(value: Any) -> Any:
    """JSON has one kind of number: 5.0 is the integer 5 (JSON Schema agrees), "5" and true are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integral_items(value: Any) -> Any:
    if isinstance(value, list) and float in set(map(type, value)):  # set(map(...)) runs in C: long prompts
        return [_integral(v) for v in value]
    return value


INTEGRAL = BeforeValidator(_integral)
TokenId = Annotated[int, Field(ge=0, json_schema_extra=limit("token_id"))]
TokenIdList = Annotated[list[TokenId], BeforeValidator(_integral_items)]
TokenIds = Annotated[TokenIdList, Field(min_length=1, json_schema_extra=limit("prompt_ids"))]
NonEmptyStr = Annotated[str, Field(min_length=1)]
ModelName = Annotated[str, Field(json_schema_extra=limit("model"))]
StopString = Annotated[str, Field(min_length=1, json_schema_extra=limit("stop_string"))]
StopStrings = Annotated[list[StopString], Field(json_schema_extra=limit("stop_list"))]
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)$")],
                           Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                      Field(json_schema_extra=keys_as_property_names)]
PromptList = Annotated[list[T], Field(min_length=1, json_schema_extra=limit("prompt_list"))]  # a batch of prompts
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL]
Int64Count = Annotated[int, Field(ge=0, le=INT64_MAX), INTEGRAL]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Words = list[Annotated[str, Field(pattern=r"\S")]]  # a word with something besides blanks
AllowedTokens = Annotated[TokenIdList, Field(min_length=1)]


def _not_zero(value: int) -> int:
    if value == 0:
        raise ValueError("0 would leave no prompt: give -1 (the context's length) or a count >= 1")
    return value


# -1: the context's length; 0 would leave no prompt at all
TruncateTokens = Annotated[int, Field(ge=-1, le=INT64_MAX, json_schema_extra={"not": {"const": 0}}), INTEGRAL,
                           AfterValidator(_not_zero)]
