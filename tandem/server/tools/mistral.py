"""Mistral: ``[TOOL_CALLS]`` then either a JSON list of calls (``[{"name": ..., "arguments": {...}}]``,
the format of tokenizers before v11) or, from v11, ``name[ARGS]{...}`` with one ``[TOOL_CALLS]`` per
call (``name[CALL_ID]id[ARGS]{...}`` too). ``[TOOL_CALLS]`` is a special token in Mistral's
tokenizers: with ``skip_special_tokens`` on (the default) it is not in the text, so an output that
opens with ``[`` is read as the list form as well. Mistral's chat templates want call ids of nine
letters and digits: ids are made so."""
from __future__ import annotations

import json
import re
import secrets

from tandem.server.tools.base import _ALNUM, ToolParser
from tandem.server.tools.json_calls import arguments_json, calls_of, json_values

_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\](.*)", re.DOTALL)


class MistralToolParser(ToolParser):
    name = "mistral"
    starts = ("[TOOL_CALLS]",)
    end = None
    bare_start = "["

    def decode(self, body: str) -> list[tuple[str, str]] | None:
        named = _NAMED.fullmatch(body)
        if named is not None:
            try:
                arguments = arguments_json(json.loads(named.group(3)))
            except ValueError:
                return None
            return None if arguments is None else [(named.group(1), arguments)]
        values = json_values(body)
        if values is None or len(values) != 1 or not isinstance(values[0], list):
            return None
        return calls_of(values[0])

    def new_id(self) -> str:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
