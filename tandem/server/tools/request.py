"""What a chat request asks of tools (``tools``, ``tool_choice``, ``parallel_tool_calls``), checked
against the server's options: every combination is either served or refused with a 400 naming the
field, as in vLLM (``"auto"`` needs ``--enable-auto-tool-choice`` and ``--tool-call-parser``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.server.errors import APIError
from tandem.server.tools.forced import parameters_schema, required_schema
from tandem.server.tools.protocol import ChatTool, NamedToolChoice, template_tools
from tandem.server.tools.registry import tool_parser
from tandem.server.tools.strict import structural_tag


@dataclass
class ToolUse:
    tools: list[dict[str, Any]] | None  # what the chat template gets (None: no tools)
    mode: str = "none"  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the function of a named tool_choice
    parallel: bool = True
    schema: dict[str, Any] | None = None  # the JSON schema the output must follow (required, named)
    structural_tag: dict[str, Any] | None = None  # auto with strict tools: calls follow their schemas


def tool_use(tools: list[ChatTool] | None, tool_choice: str | NamedToolChoice | None, parallel: bool,
             auto_parser: str | None) -> ToolUse:
    """``auto_parser``: the server's tool-call parser when --enable-auto-tool-choice is on, else None."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: the request lists none", "tool_choice")
        return ToolUse(None)
    dicts = template_tools(tools) or []
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise APIError(400, "tools: two tools have the same function name", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolUse(dicts)
    if choice == "auto":
        return _auto(tools, dicts, parallel, auto_parser)
    if choice == "required":
        return ToolUse(dicts, "required", parallel=parallel, schema=required_schema(dicts, parallel))
    name = choice.function.name  # type: ignore[union-attr]
    if name not in names:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice")
    return ToolUse(dicts, "named", named=name, parallel=parallel,
                   schema=parameters_schema(dicts[names.index(name)]))


def _auto(tools: list[ChatTool], dicts: list[dict[str, Any]], parallel: bool, auto_parser: str | None) -> ToolUse:
    if auto_parser is None:
        raise APIError(400, 'tool_choice "auto" (the default with tools) needs the server started with '
                            "--enable-auto-tool-choice and --tool-call-parser NAME; or send tool_choice "
                            '"none", "required" or a named function', "tool_choice")
    strict = [bool(t.function.strict) for t in tools]
    if not any(strict):
        return ToolUse(dicts, "auto", parallel=parallel)
    fmt = tool_parser(auto_parser).strict_format
    if fmt is None:
        raise APIError(400, f'tools: "strict": true under tool_choice "auto" is not implemented for the '
                            f"{auto_parser!r} tool-call parser (its calls cannot be told from text by one "
                            'trigger); use tool_choice "required" or a named function, or strict: false', "tools")
    return ToolUse(dicts, "auto", parallel=parallel, structural_tag=structural_tag(fmt, dicts, strict, parallel))
