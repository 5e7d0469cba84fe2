"""Tool calls: parsers of models' call formats (one module each, a registry by name), the streaming
scanner they share, and what ``tool_choice: "required"`` or a named function constrains the output to."""
from tandem.server.tools.base import ToolCall, ToolCallStream, ToolDelta, ToolParser, parse_tool_calls
from tandem.server.tools.registry import TOOL_PARSERS, tool_parser

__all__ = ["TOOL_PARSERS", "ToolCall", "ToolCallStream", "ToolDelta", "ToolParser", "parse_tool_calls",
           "tool_parser"]
