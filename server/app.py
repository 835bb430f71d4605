"""The FastAPI app: routes, OpenAI-shaped errors, the optional API key, and ``build_and_run``.

Error mapping: a malformed body or a bad field is 400 naming the field; a prompt the engine rejects is
400; a full waiting queue is 429 with Retry-After; an unknown model is 404; a bad API key is 401; a
server that stopped accepting work is 503. Every error body is ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffulex.config import EngineConfig, ServerConfig

from . import chat, completions, health, metrics, models_route
from .engine_client import EngineClient
from .protocol import APIError, error_body
from .replica_client import DataParallelClient
from .serving import ClientDisconnected, Serving

logger = logging.getLogger(__name__)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body, phrased for a client, and the field it is about."""
    item = error.errors()[0]
    loc = [str(part) for part in item.get("loc", ()) if part != "body"]
    # Union members add their type name to the location (prompt.str, prompt.list[int]): drop those.
    loc = [part for part in loc if not any(ch in part for ch in "[]") and part not in ("str", "int")]
    param = ".".join(loc) or None
    if item.get("type") == "extra_forbidden":
        return f"unknown field '{param}'", param
    if item.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {item.get('ctx', {}).get('error', '')}".strip(), None
    if item.get("type") == "missing":
        return (f"missing required field '{param}'" if param else "the request body is missing"), param
    return f"invalid value for '{param}': {item.get('msg')}", param


class _CountResponses:
    """Pure ASGI middleware counting responses by path and status (works with streaming responses)."""

    def __init__(self, app: Any, counter: Any):
        self.app = app
        self.counter = counter

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(
    client: EngineClient | DataParallelClient, server_config: ServerConfig | None = None
) -> FastAPI:
    """The HTTP app over a running EngineClient (the caller owns the client and shuts it down)."""
    config = server_config or ServerConfig()
    model_name = config.served_model_name or Path(client.engine.config.model).name
    app = FastAPI(title="Diffulex", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.serving = Serving(client, config, model_name)
    app.state.metrics = metrics.Metrics(client)

    async def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != config.api_key:
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    protected = [Depends(check_api_key)]
    app.include_router(completions.router, dependencies=protected)
    app.include_router(chat.router, dependencies=protected)
    app.include_router(models_route.router, dependencies=protected)
    app.include_router(health.router)
    app.include_router(metrics.router)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(request: Request, error: ClientDisconnected) -> JSONResponse:
        # Nobody reads this: the request was aborted; 499 (nginx's "client closed request") for the logs.
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=499)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(error.detail), kind), status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {error}", "server_error"), status_code=500)

    app.add_middleware(_CountResponses, counter=app.state.metrics.http_responses)
    return app


def curl_example(server_config: ServerConfig, model_name: str) -> str:
    host = "127.0.0.1" if server_config.host in ("0.0.0.0", "::", "") else server_config.host
    body = f'{{"model": "{model_name}", "prompt": "Hello", "max_tokens": 16}}'
    auth = ' -H "Authorization: Bearer $DIFFULEX_API_KEY"' if server_config.api_key else ""
    return (
        f"curl -s http://{host}:{server_config.port}/v1/completions -H 'Content-Type: application/json'"
        f"{auth} -d {shlex.quote(body)}"
    )


def start_engine_client(engine_config: EngineConfig) -> EngineClient | DataParallelClient:
    """One in-process engine (``data_parallel_size`` 1), or that many replica processes behind one client."""
    if engine_config.data_parallel_size > 1:
        return DataParallelClient(engine_config)
    from diffulex.engine.engine import Engine

    return EngineClient(Engine(engine_config))


def build_and_run(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Load the engine, serve until interrupted, then drain running requests and stop the engine."""
    import uvicorn

    client = start_engine_client(engine_config)
    app = create_app(client, server_config)
    model_name = app.state.serving.model_name
    print(f"Diffulex serving '{model_name}' on http://{server_config.host}:{server_config.port}", flush=True)
    print(f"Try:\n  {curl_example(server_config, model_name)}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="info")
    )
    try:
        server.run()
    finally:
        client.shutdown(drain=True)
