"""Ingress: the HTTP API (Starlette) and the same API as Python methods for handles."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments.router import RoutedBackend, sum_router_stats
from serve_app.config import AppArgs
from serve_app.engine.factory import serving_limits
from serve_app.frontend import OpenAIFrontend, Prepared
from serve_app.protocol import APIError

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, replicas: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        tokenizer, self.max_model_len = serving_limits(self.args)
        self.router = router
        self.replicas = replicas
        self.frontend = OpenAIFrontend(self.args, tokenizer, self.max_model_len,
                                       RoutedBackend(router, replicas, self.args.retry_after_s))

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_http_app(self)

    # ---------------------------------------------------------------- handle API
    # Same semantics as the HTTP routes, for `serve.get_app_handle(...)` callers.

    async def completions(self, body: dict) -> dict:
        return await self._run(self.frontend.completion(self.frontend.prepare_completion(body)))

    async def chat(self, body: dict) -> dict:
        return await self._run(self.frontend.chat(self.frontend.prepare_chat(body)))

    async def completions_stream(self, body: dict) -> AsyncIterator[dict]:
        async with aclosing(self.frontend.completion_chunks(self.frontend.prepare_completion(body))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def chat_stream(self, body: dict) -> AsyncIterator[dict]:
        async with aclosing(self.frontend.chat_chunks(self.frontend.prepare_chat(body))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate(self, body: dict) -> dict:
        return await self._run(self.frontend.generate(self.frontend.prepare_generate(body)))

    async def stats(self, include_replicas: bool = False) -> dict:
        """Router counters (all Router replicas); with `include_replicas`, what each model
        replica reports about itself (broadcasts: for operators and tests, not hot paths)."""
        routers = await asyncio.wait_for(self.router.broadcast("stats").results_async(), timeout=10)
        stats = {"model": self.args.model_name, "max_model_len": self.max_model_len,
                 "router": sum_router_stats(routers)}
        if include_replicas:
            infos = await asyncio.wait_for(self.replicas.broadcast("info").results_async(), timeout=10)
            stats["router"]["replica_info"] = sorted(infos, key=lambda r: r["replica_id"])
        return stats

    async def _run(self, work, timeout: float | None = None):
        timeout = timeout or self.args.request_timeout_s
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise APIError(504, f"the request did not finish within its {timeout:g} s timeout",
                           type="timeout_error", code="request_timeout") from None


# -------------------------------------------------------------------- HTTP


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_http_app(ingress: Ingress) -> Starlette:
    args = ingress.args
    frontend = ingress.frontend

    def check_auth(request: Request) -> None:
        if args.api_key and request.headers.get("authorization") != f"Bearer {args.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request):
        check_auth(request)
        too_large = APIError(413, f"request body is larger than {args.max_body_bytes} bytes", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > args.max_body_bytes:
            raise too_large  # refuse before reading it
        raw = await request.body()
        if len(raw) > args.max_body_bytes:
            raise too_large
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def timeout_of(request: Request) -> float | None:
        header = request.headers.get("x-request-timeout")
        if header is None:
            return args.request_timeout_s
        try:
            value = float(header)
            if value <= 0:
                raise ValueError
        except ValueError:
            raise APIError(400, "X-Request-Timeout must be a positive number of seconds",
                           param="X-Request-Timeout") from None
        return min(value, args.request_timeout_s or value)

    async def respond(request: Request, prepare, run, chunks) -> Response:
        timeout = timeout_of(request)
        prepared: Prepared = prepare(await read_json(request))
        if not prepared.body.stream:
            return JSONResponse(await ingress._run(run(prepared), timeout))
        stream = chunks(prepared)
        # Start generating before answering, so queue-full and early errors get a real status.
        first = await ingress._run(anext(stream), timeout)
        return StreamingResponse(sse(first, stream, timeout), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request) -> Response:
        return await respond(request, frontend.prepare_completion, frontend.completion, frontend.completion_chunks)

    async def chat_completions(request: Request) -> Response:
        return await respond(request, frontend.prepare_chat, frontend.chat, frontend.chat_chunks)

    async def generate(request: Request) -> Response:
        timeout = timeout_of(request)
        prepared = frontend.prepare_generate(await read_json(request))
        return JSONResponse(await ingress._run(frontend.generate(prepared), timeout))

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse(frontend.models())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": args.model_name})

    async def stats(request: Request) -> Response:
        check_auth(request)
        include = request.query_params.get("replicas", "").lower() in ("1", "true", "yes")
        return JSONResponse(await ingress.stats(include))

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(APIError(exc.status_code, message, code=kind))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected},
    )


async def sse(first: dict, rest: AsyncIterator[dict], timeout: float | None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's framing; errors after the first byte become an error event."""
    yield f"data: {json.dumps(first)}\n\n"
    try:
        async with asyncio.timeout(timeout):
            async for chunk in rest:
                yield f"data: {json.dumps(chunk)}\n\n"
    except TimeoutError:
        err = APIError(504, f"the request did not finish within its {timeout:g} s timeout",
                       type="timeout_error", code="request_timeout")
        yield f"data: {json.dumps(err.body())}\n\n"
    except APIError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"
