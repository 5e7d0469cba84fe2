"""``"strict": true`` tools under ``tool_choice: "auto"``: the model may write text or call tools, and
a call it starts must follow its tool's schema. The output gets xgrammar's structural tag: free text
until the parser's trigger (``<tool_call>``), then one of the tools' calls in the parser's own format,
its arguments following the tool's parameters schema for strict tools (any JSON object for the
others), then free text again until the next trigger. So the text stays readable by the same parser.

A parser supports it by declaring ``strict_format``: the trigger, and each call's beginning (with the
function's name, JSON-escaped) and end around the arguments object."""
from __future__ import annotations

import json
from typing import Any

from tandem.server.tools.base import StrictFormat
from tandem.server.tools.forced import ANY_OBJECT, parameters_schema


def structural_tag(fmt: StrictFormat, tools: list[dict[str, Any]], strict: list[bool],
                   parallel: bool) -> dict[str, Any]:
    """The structural tag (xgrammar's JSON form) for these tools in this format."""
    tags = [{"type": "tag", "begin": fmt.begin.replace("{name}", json.dumps(t["function"]["name"])[1:-1]),
             "content": {"type": "json_schema", "json_schema": parameters_schema(t) if is_strict else ANY_OBJECT},
             "end": fmt.end} for t, is_strict in zip(tools, strict)]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [fmt.trigger],
                                                 "tags": tags, "stop_after_first": not parallel}}
