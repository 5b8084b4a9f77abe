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

from deployments.process import start_process
from deployments.metrics import count_error
from deployments.routed_backend import EmbeddingBackend, RoutedBackend
from deployments.router import sum_router_stats
from serve_app.config import AppArgs
from serve_app.deadline import Deadline
from serve_app.embeddings import EmbeddingFrontend
from serve_app.engine.embedding import read_spec
from serve_app.engine.factory import serving_limits
from serve_app.engine.loading import load_tokenizer
from serve_app.frontend import OpenAIFrontend, Prepared, ServedModels
from serve_app.protocol import APIError
from serve_app.security import allowed_hosts, check_api_key, check_edge, load_api_keys

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The API of every model in the app: `model` in a request picks its frontend, which runs it
    through that model's Router and replicas."""

    def __init__(self, routers: dict[str, DeploymentHandle], replicas: dict[str, DeploymentHandle], args: AppArgs):
        self.args = start_process(args)
        self.api_keys = load_api_keys(self.args)
        self.routers = routers
        self.replicas = replicas
        frontends: dict = {}
        for model in self.args.serving_args():
            name = model.model_name
            backend = RoutedBackend(routers[name], replicas[name], model.retry_after_s, name, model.lease_timeout_s,
                                    model.model if model.enable_prefix_caching and model.task == "generate" else None)
            if model.task == "embed":
                tokenizer = load_tokenizer(model.model)
                spec = read_spec(model.model, model.max_model_len, tokenizer)
                frontends[name] = EmbeddingFrontend(model, tokenizer, spec,
                                                    EmbeddingBackend(backend, model.max_batch_size))
            else:
                tokenizer, max_model_len = serving_limits(model)
                frontends[name] = OpenAIFrontend(model, tokenizer, max_model_len, backend)
        self.served = ServedModels(frontends, {m.model_name: m.task for m in self.args.models})
        # Validation, templating and tokenization run here, off the event loop: a 900 kB
        # prompt must not stall every other stream and /health of this ingress. One thread:
        # the tokenizer releases the GIL, and requests are prepared in arrival order.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._ready: dict[str, tuple[float, int]] = {}  # model -> (monotonic time of a positive check, replicas)
        logger.info("ingress: models %s, API keys %d",
                    ", ".join(f"{n} ({self.served.tasks[n]}, context {f.max_model_len})"
                              for n, f in frontends.items()), len(self.api_keys))

    async def prepare(self, prepare, body):
        """`prepare(body)` on the preparing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, prepare, body)

    async def ready(self) -> dict[str, int]:
        """Each model's replicas that can serve now, as its Router sees them (0 also when the
        Router does not answer). Cached for a second: probes may come often."""
        async def one(name: str) -> tuple[str, int]:
            at, count = self._ready.get(name, (0.0, 0))
            if time.monotonic() - at < 1.0:
                return name, count
            try:
                count = await asyncio.wait_for(self.routers[name].ready_replicas.remote(), timeout=2.0)
            except Exception:  # the router is dead, restarting or overloaded
                count = 0
            self._ready[name] = (time.monotonic() if count else 0.0, count)
            return name, count

        return dict(await asyncio.gather(*(one(name) for name in self.routers)))

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_http_app(self)

    # ---------------------------------------------------------------- handle API
    # Same semantics as the HTTP routes, for `serve.get_app_handle(...)` callers.

    # Each has the deadline `request_timeout_s`, from the call on, like an HTTP request's.

    async def completions(self, body: dict) -> dict:
        frontend = self.served.for_body(body, "generate")
        return await Deadline(self.args.request_timeout_s).run(
            self._answer(frontend.prepare_completion, frontend.completion, body))

    async def chat(self, body: dict) -> dict:
        frontend = self.served.for_body(body, "generate")
        return await Deadline(self.args.request_timeout_s).run(self._answer(frontend.prepare_chat, frontend.chat, body))

    async def completions_stream(self, body: dict) -> AsyncIterator[dict]:
        frontend = self.served.for_body(body, "generate")
        async for chunk in self._chunks(frontend.prepare_completion, frontend.completion_chunks, body):
            yield chunk

    async def chat_stream(self, body: dict) -> AsyncIterator[dict]:
        frontend = self.served.for_body(body, "generate")
        async for chunk in self._chunks(frontend.prepare_chat, frontend.chat_chunks, body):
            yield chunk

    async def generate(self, body: dict) -> dict:
        frontend = self.generate_frontend()
        return await Deadline(self.args.request_timeout_s).run(
            self._answer(frontend.prepare_generate, frontend.generate, body))

    async def embeddings(self, body: dict) -> dict:
        """OpenAI's embeddings: `{"model", "input", ...}` -> `{"data": [{"embedding", "index"}], "usage"}`."""
        frontend = self.served.for_body(body, "embed")
        return await Deadline(self.args.request_timeout_s).run(
            self._answer(frontend.prepare, frontend.embeddings, body))

    async def _answer(self, prepare, run, body):
        return await run(await self.prepare(prepare, body))

    async def _chunks(self, prepare, chunks, body) -> AsyncIterator[dict]:
        deadline = Deadline(self.args.request_timeout_s)
        prepared = await deadline.run(self.prepare(prepare, body))
        async with aclosing(deadline.stream(chunks(prepared))) as stream:
            async for chunk in stream:
                yield chunk

    def generate_frontend(self) -> OpenAIFrontend:
        """`/generate` has no `model` field: it runs on the first generation model configured."""
        frontend = self.served.first("generate")
        if frontend is None:
            raise APIError(404, "this server serves no generation model", code="model_not_found")
        return frontend

    async def stats(self, include_replicas: bool = False) -> dict:
        """Each model's Router counters (all its Router replicas); with `include_replicas`, what
        each of its replicas reports about itself (broadcasts: for operators and tests, not hot
        paths). A part that does not answer (dead, restarting) is counted in `unreachable`."""
        async def one(name: str) -> tuple[str, dict]:
            frontend = self.served.frontends[name]
            routers = await self.routers[name].broadcast("stats").results_async(timeout_s=5, return_exceptions=True)
            stats = {"task": self.served.tasks[name], "max_model_len": frontend.max_model_len,
                     "router": sum_router_stats([r for r in routers if isinstance(r, dict)]),
                     "unreachable": {"routers": sum(not isinstance(r, dict) for r in routers)}}
            if self.served.tasks[name] == "embed":
                stats["dimensions"] = frontend.spec.dimensions
            if include_replicas:
                infos = await self.replicas[name].broadcast("info").results_async(timeout_s=5,
                                                                                  return_exceptions=True)
                stats["router"]["replica_info"] = sorted((i for i in infos if isinstance(i, dict)),
                                                         key=lambda r: r["replica_id"])
                stats["unreachable"]["model_replicas"] = sum(not isinstance(i, dict) for i in infos)
            return name, stats

        return {"models": dict(await asyncio.gather(*(one(name) for name in self.routers)))}


# -------------------------------------------------------------------- HTTP


def error_response(err: APIError, model_name: str) -> JSONResponse:
    """The error in OpenAI's shape, counted in the error metric (every error answer passes here),
    under the request's model ("" before a model was chosen)."""
    count_error(model_name, err.status, err.code)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_http_app(ingress: Ingress) -> Starlette:
    args = ingress.args
    served = ingress.served

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

    async def read_request(request: Request, task: str):
        """(body, the frontend of its model); the model's name is kept for the error metric."""
        body = await read_json(request)
        frontend = served.for_body(body, task)
        request.state.model = frontend.model_name
        return body, frontend

    def deadline_of(request: Request) -> Deadline:
        """The request's one deadline, from now: request_timeout_s, or X-Request-Timeout if sooner."""
        header = request.headers.get("x-request-timeout")
        if header is None:
            return Deadline(args.request_timeout_s)
        try:
            value = float(header)
            if not (math.isfinite(value) and value > 0):
                raise ValueError
        except ValueError:
            raise APIError(400, "X-Request-Timeout must be a positive number of seconds",
                           param="X-Request-Timeout") from None
        return Deadline(min(value, args.request_timeout_s or value))

    def tenant_of(request: Request) -> str:
        """Who is asking, when tenants must not share cached prompt blocks (a digest of their key)."""
        if not (args.prefix_cache_salt_by_api_key and ingress.api_keys):
            return ""
        key = (request.headers.get("authorization") or "").partition(" ")[2].strip()
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def respond(request: Request, kind: str) -> Response:
        deadline = deadline_of(request)
        body, frontend = await read_request(request, "generate")
        prepare, run, chunks = ((frontend.prepare_completion, frontend.completion, frontend.completion_chunks)
                                if kind == "completion" else (frontend.prepare_chat, frontend.chat, frontend.chat_chunks))
        prepared: Prepared = await deadline.run(
            ingress.prepare(functools.partial(prepare, tenant=tenant_of(request)), body))
        if not prepared.body.stream:
            return JSONResponse(await deadline.run(run(prepared)))
        stream = deadline.stream(chunks(prepared))
        # Start generating before answering, so queue-full and early errors get a real status.
        first = await anext(stream)
        return StreamingResponse(sse(first, stream, frontend.model_name), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request) -> Response:
        return await respond(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await respond(request, "chat")

    async def embeddings(request: Request) -> Response:
        deadline = deadline_of(request)
        body, frontend = await read_request(request, "embed")
        return JSONResponse(await deadline.run(ingress._answer(frontend.prepare, frontend.embeddings, body)))

    async def generate(request: Request) -> Response:
        deadline = deadline_of(request)
        frontend = ingress.generate_frontend()
        request.state.model = frontend.model_name
        body = await read_json(request)
        return JSONResponse(await deadline.run(ingress._answer(frontend.prepare_generate, frontend.generate, body)))

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse(served.models())

    async def health(request: Request) -> Response:
        """Readiness: 200 once every model has a replica that can serve, else 503 naming those
        that have none (load balancers, k8s readinessProbe)."""
        ready = await ingress.ready()
        waiting = [name for name, count in ready.items() if not count]
        if waiting:
            raise APIError(503, "no replica is ready yet (loading, or restarting) for: "
                                + ", ".join(f"'{n}'" for n in waiting), type="server_error", code="not_ready",
                           retry_after=args.retry_after_s)
        return JSONResponse({"status": "ok", "ready_replicas": ready})

    async def live(request: Request) -> Response:
        """Liveness: this ingress answers (k8s livenessProbe); says nothing about the models."""
        return JSONResponse({"status": "alive"})

    async def stats(request: Request) -> Response:
        check_auth(request)
        include = request.query_params.get("replicas", "").lower() in ("1", "true", "yes")
        if include and not ingress.api_keys and not _is_loopback(request):
            # A fan-out to every replica: not for anonymous remote callers.
            raise APIError(403, "per-replica stats are served to loopback clients only unless an API key is set",
                           code="forbidden")
        return JSONResponse(await ingress.stats(include))

    def model_of(request: Request) -> str:
        return getattr(request.state, "model", "")

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, model_of(request))

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(APIError(exc.status_code, message, code=kind), model_of(request))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                       code="internal_error"), model_of(request))

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/live", live, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
        ],
        middleware=[Middleware(EdgeGuard, args=args, hosts=allowed_hosts(args, ingress.api_keys))],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected},
    )


class EdgeGuard:
    """ASGI middleware: Host allow-list and Ray's control headers, checked for every
    request (unknown routes included) before a route reads anything."""

    def __init__(self, app, args: AppArgs, hosts: list[str] | None):
        self.app = app
        self.args = args
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            try:
                check_edge(headers, self.args, self.hosts)
            except APIError as err:
                await error_response(err, "")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def sse(first: dict, rest: AsyncIterator[dict], model_name: str = "") -> AsyncIterator[str]:
    """Server-sent events in OpenAI's framing; an error after the first byte (the deadline's 504
    included) becomes a final error event."""
    yield f"data: {json.dumps(first)}\n\n"
    try:
        async for chunk in rest:
            yield f"data: {json.dumps(chunk)}\n\n"
    except APIError as err:
        count_error(model_name, err.status, err.code)
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"
