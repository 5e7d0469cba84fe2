"""Request bodies are parsed as strict JSON (RFC 8259) by msgspec instead of the standard library.

``json.loads`` accepts what no other component downstream can take: lone UTF-16 surrogates
(``"\\ud800"``, which the tokenizer and the message encoder to the core reject), ``NaN`` and
``Infinity``, and it raises ``RecursionError`` on deep nesting. msgspec refuses all of these, so they
become a 400 at the door ("the request body is not valid JSON: ...") like any malformed body, and it
is several times faster on large token-id prompts."""
from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = msgspec.json.decode(body)
            except msgspec.DecodeError as exc:  # ValidationError (numbers out of range) included
                raise json.JSONDecodeError(str(exc), "", 0) from exc
            except RecursionError as exc:
                raise json.JSONDecodeError("nested too deeply", "", 0) from exc
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose handlers see a ``StrictJSONRequest`` (FastAPI's documented custom-request hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
