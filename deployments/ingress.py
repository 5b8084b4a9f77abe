"""Ingress: the HTTP API (Starlette) and the same API as Python methods for handles."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments import metrics, quiet_logs
from deployments.metrics import count_error
from deployments.router import RoutedBackend, sum_router_stats
from serve_app.config import AppArgs
from serve_app.engine.factory import serving_limits
from serve_app.frontend import OpenAIFrontend, Prepared
from serve_app.protocol import APIError
from serve_app.security import check_api_key, check_edge, load_api_keys

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, replicas: DeploymentHandle, args: dict):
        quiet_logs.install()
        self.args = AppArgs.model_validate(args)
        metrics.set_enabled(self.args.metrics)
        self.api_keys = load_api_keys(self.args)
        tokenizer, self.max_model_len = serving_limits(self.args)
        self.router = router
        self.replicas = replicas
        self.frontend = OpenAIFrontend(self.args, tokenizer, self.max_model_len,
                                       RoutedBackend(router, replicas, self.args.retry_after_s,
                                                     self.args.model_name, self.args.lease_timeout_s,
                                                     self.args.model if self.args.enable_prefix_caching else None))
        # Validation, templating and tokenization run here, off the event loop: a 900 kB
        # prompt must not stall every other stream and /health of this ingress. One thread:
        # the tokenizer releases the GIL, and requests are prepared in arrival order.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._ready_at = 0.0  # monotonic time of the last positive readiness check
        self._ready_replicas = 0
        logger.info("ingress: model %s, max_model_len %d, API keys %d", self.args.model_name,
                    self.max_model_len, len(self.api_keys))

    async def prepare(self, prepare, body):
        """`prepare(body)` on the preparing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, prepare, body)

    async def ready(self) -> int:
        """Model replicas that can serve now, as the Router sees them (0 also when the
        Router does not answer). Cached for a second: probes may come often."""
        if time.monotonic() - self._ready_at < 1.0:
            return self._ready_replicas
        try:
            self._ready_replicas = await asyncio.wait_for(self.router.ready_replicas.remote(), timeout=2.0)
        except Exception:  # the router is dead, restarting or overloaded
            self._ready_replicas = 0
        if self._ready_replicas:
            self._ready_at = time.monotonic()
        return self._ready_replicas

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_http_app(self)

    # ---------------------------------------------------------------- handle API
    # Same semantics as the HTTP routes, for `serve.get_app_handle(...)` callers.

    async def completions(self, body: dict) -> dict:
        prepared = await self.prepare(self.frontend.prepare_completion, body)
        return await self._run(self.frontend.completion(prepared))

    async def chat(self, body: dict) -> dict:
        return await self._run(self.frontend.chat(await self.prepare(self.frontend.prepare_chat, body)))

    async def completions_stream(self, body: dict) -> AsyncIterator[dict]:
        prepared = await self.prepare(self.frontend.prepare_completion, body)
        async with aclosing(self.frontend.completion_chunks(prepared)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def chat_stream(self, body: dict) -> AsyncIterator[dict]:
        prepared = await self.prepare(self.frontend.prepare_chat, body)
        async with aclosing(self.frontend.chat_chunks(prepared)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate(self, body: dict) -> dict:
        return await self._run(self.frontend.generate(await self.prepare(self.frontend.prepare_generate, body)))

    async def stats(self, include_replicas: bool = False) -> dict:
        """Router counters (all Router replicas); with `include_replicas`, what each model
        replica reports about itself (broadcasts: for operators and tests, not hot paths).
        A part that does not answer (dead, restarting) is counted in `unreachable`."""
        routers = await self.router.broadcast("stats").results_async(timeout_s=5, return_exceptions=True)
        stats = {"model": self.args.model_name, "max_model_len": self.max_model_len,
                 "router": sum_router_stats([r for r in routers if isinstance(r, dict)]),
                 "unreachable": {"routers": sum(not isinstance(r, dict) for r in routers)}}
        if include_replicas:
            infos = await self.replicas.broadcast("info").results_async(timeout_s=5, return_exceptions=True)
            stats["router"]["replica_info"] = sorted((i for i in infos if isinstance(i, dict)),
                                                     key=lambda r: r["replica_id"])
            stats["unreachable"]["model_replicas"] = sum(not isinstance(i, dict) for i in infos)
        return stats

    async def _run(self, work, timeout: float | None = None):
        timeout = timeout or self.args.request_timeout_s
        try:
            return await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise APIError(504, f"the request did not finish within its {timeout:g} s timeout",
                           type="timeout_error", code="request_timeout") from None


# -------------------------------------------------------------------- HTTP


def error_response(err: APIError, model_name: str) -> JSONResponse:
    """The error in OpenAI's shape, counted in the error metric (every error answer passes here)."""
    count_error(model_name, err.status, err.code)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_http_app(ingress: Ingress) -> Starlette:
    args = ingress.args
    frontend = ingress.frontend

    def check_auth(request: Request) -> None:
        check_api_key(request.headers.get("authorization"), ingress.api_keys)

    async def read_json(request: Request):
        """The body as JSON: authenticated, declared as JSON, bounded in size and in time."""
        check_auth(request)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            # Also what keeps a cross-site form or text/plain POST from a browser out.
            raise APIError(415, "send the request body as JSON with 'Content-Type: application/json'",
                           param="Content-Type", code="unsupported_media_type")
        too_large = APIError(413, f"request body is larger than {args.max_body_bytes} bytes", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > args.max_body_bytes:
            raise too_large  # refuse before reading it
        raw = bytearray()
        try:
            async with asyncio.timeout(args.body_read_timeout_s):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > args.max_body_bytes:
                        raise too_large  # chunked uploads declare no length: stop at the limit
        except TimeoutError:
            raise APIError(408, f"the request body was not received within {args.body_read_timeout_s:g} s",
                           code="body_timeout") from None
        try:
            return json.loads(raw)
        # ValueError: bad JSON, bad UTF-8, an integer of more than 4300 digits;
        # RecursionError: arrays nested thousands deep.
        except (ValueError, RecursionError) as e:
            reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)
            raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None

    def timeout_of(request: Request) -> float | None:
        header = request.headers.get("x-request-timeout")
        if header is None:
            return args.request_timeout_s
        try:
            value = float(header)
            if not (math.isfinite(value) and value > 0):
                raise ValueError
        except ValueError:
            raise APIError(400, "X-Request-Timeout must be a positive number of seconds",
                           param="X-Request-Timeout") from None
        return min(value, args.request_timeout_s or value)

    def tenant_of(request: Request) -> str:
        """Who is asking, when tenants must not share cached prompt blocks (a digest of their key)."""
        if not (args.prefix_cache_salt_by_api_key and ingress.api_keys):
            return ""
        key = (request.headers.get("authorization") or "").partition(" ")[2].strip()
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def respond(request: Request, prepare, run, chunks) -> Response:
        timeout = timeout_of(request)
        body = await read_json(request)
        prepared: Prepared = await ingress.prepare(functools.partial(prepare, tenant=tenant_of(request)), body)
        if not prepared.body.stream:
            return JSONResponse(await ingress._run(run(prepared), timeout))
        stream = chunks(prepared)
        # Start generating before answering, so queue-full and early errors get a real status.
        first = await ingress._run(anext(stream), timeout)
        return StreamingResponse(sse(first, stream, timeout, args.model_name), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request) -> Response:
        return await respond(request, frontend.prepare_completion, frontend.completion, frontend.completion_chunks)

    async def chat_completions(request: Request) -> Response:
        return await respond(request, frontend.prepare_chat, frontend.chat, frontend.chat_chunks)

    async def generate(request: Request) -> Response:
        timeout = timeout_of(request)
        prepared = await ingress.prepare(frontend.prepare_generate, await read_json(request))
        return JSONResponse(await ingress._run(frontend.generate(prepared), timeout))

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse(frontend.models())

    async def health(request: Request) -> Response:
        """Readiness: 200 once a model replica can serve, else 503 (load balancers, k8s readinessProbe)."""
        replicas = await ingress.ready()
        if not replicas:
            raise APIError(503, "no model replica is ready yet (loading, or restarting)", type="server_error",
                           code="not_ready", retry_after=args.retry_after_s)
        return JSONResponse({"status": "ok", "model": args.model_name, "ready_replicas": replicas})

    async def live(request: Request) -> Response:
        """Liveness: this ingress answers (k8s livenessProbe); says nothing about the model."""
        return JSONResponse({"status": "alive"})

    async def stats(request: Request) -> Response:
        check_auth(request)
        include = request.query_params.get("replicas", "").lower() in ("1", "true", "yes")
        if include and not ingress.api_keys and not _is_loopback(request):
            # A fan-out to every replica: not for anonymous remote callers.
            raise APIError(403, "per-replica stats are served to loopback clients only unless an API key is set",
                           code="forbidden")
        return JSONResponse(await ingress.stats(include))

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, args.model_name)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(APIError(exc.status_code, message, code=kind), args.model_name)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                       code="internal_error"), args.model_name)

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/live", live, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
        ],
        middleware=[Middleware(EdgeGuard, args=args)],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected},
    )


class EdgeGuard:
    """ASGI middleware: Host allow-list and Ray's control headers, checked for every
    request (unknown routes included) before a route reads anything."""

    def __init__(self, app, args: AppArgs):
        self.app = app
        self.args = args

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                check_edge(headers, self.args)
            except APIError as err:
                await error_response(err, self.args.model_name)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def sse(first: dict, rest: AsyncIterator[dict], timeout: float | None, model_name: str = ""
              ) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's framing; errors after the first byte become an error event."""
    yield f"data: {json.dumps(first)}\n\n"
    try:
        async with asyncio.timeout(timeout):
            async for chunk in rest:
                yield f"data: {json.dumps(chunk)}\n\n"
    except (TimeoutError, APIError) as e:
        err = e if isinstance(e, APIError) else APIError(
            504, f"the request did not finish within its {timeout:g} s timeout", type="timeout_error",
            code="request_timeout")
        count_error(model_name, err.status, err.code)
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"
