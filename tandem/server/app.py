"""The FastAPI application: routes, the API key, and the engine client's life cycle.

Only the ``/v1`` routes need the API key (as in vLLM): health checks, metrics scrapers and the
tokenizer probes of lm-eval work without one. Every body is size-capped and parsed as strict JSON;
CORS is off unless origins are given."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

import tandem
from tandem.server.body_limit import BodyLimitMiddleware
from tandem.server.chat_output import ChatParsing
from tandem.server.client import EngineClient
from tandem.server.defaults import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_READ_TIMEOUT_S
from tandem.server.errors import install_handlers
from tandem.server.openapi import (GENERATION_RESPONSES, HEALTH_RESPONSES, TOKENIZER_RESPONSES, ServerLimits,
                                   install_openapi)
from tandem.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                    TokenizeRequest, TokenizeResponse)
from tandem.server.request_limits import RequestLimits
from tandem.server.security import install_api_key, install_cors
from tandem.server.serving import Serving
from tandem.server.strict_json import StrictJSONRoute
from tandem.server.tokenizer_info import detokenize_response, tokenize_response, tokenize_size, tokenizer_info


def create_app(client: EngineClient, served_names: list[str], model_path: str, api_key: str | None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               allowed_origins: list[str] | None = None, limits: RequestLimits | None = None,
               read_timeout_s: float = DEFAULT_REQUEST_READ_TIMEOUT_S,
               chat_parsing: ChatParsing | None = None, sampling_defaults: dict[str, Any] | None = None) -> FastAPI:
    serving = Serving(client, served_names, limits, chat_parsing=chat_parsing, sampling_defaults=sampling_defaults)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await client.start()
        yield
        await client.close()
        serving.offload.close()

    app = FastAPI(title="tandem", version=tandem.__version__, lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    install_handlers(app)
    install_openapi(app, lambda: ServerLimits.of(serving), api_key is not None)
    # middleware added last runs first: CORS, then the key (before the body is read), then the body cap
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes, timeout_s=read_timeout_s)
    install_api_key(app, api_key)
    install_cors(app, allowed_origins)
    v1 = APIRouter(prefix="/v1", route_class=StrictJSONRoute)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        # max_model_len and vocab_size are ours (bench-serve draws token-id prompts below vocab_size)
        data = [{"id": name, "object": "model", "created": created, "owned_by": "tandem", "root": model_path,
                 "max_model_len": client.max_model_len, "vocab_size": client.model_config.vocab_size}
                for name in served_names]
        return {"object": "list", "data": data}

    @v1.post("/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await serving.completion(body, raw)

    @v1.post("/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    app.include_router(v1)

    @app.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
    async def health() -> Response:
        problem = client.health_problem()  # reads the core's stamps: a stopped core shows within seconds
        if problem is not None:
            return JSONResponse({"status": problem}, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": tandem.__version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        client.metrics.on_open_requests(len(client.routes), len(client.output_processor.requests))
        return Response(client.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_RESPONSES)
    async def tokenize_route(body: TokenizeRequest) -> Response:
        serving.model_name(body.model)
        return await serving.offload.run(tokenize_response, client.tokenizer, body, client.max_model_len,
                                         serving.limits.trust_request_chat_template, size=tokenize_size(body))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_RESPONSES)
    async def detokenize_route(body: DetokenizeRequest) -> Response:
        serving.model_name(body.model)
        return await serving.offload.run(detokenize_response, client.tokenizer, body,
                                         client.model_config.vocab_size, size=len(body.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenizer_info(client.tokenizer, client.max_model_len)

    return app

