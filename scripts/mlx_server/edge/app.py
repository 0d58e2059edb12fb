"""The HTTP application: the middleware stack, the dialect routers over the served models, and the server's own routes.

Each API dialect is one module under ``dialects`` with a router that only
translates (OpenAI chat completions, responses, legacy completions and
embeddings; Anthropic messages) and routes by the request's model through
the server's model directory (``ServedModels``, a ``pool.ModelPool``
assembled at start-up).  Errors answer in the dialect of the path they came in on.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.blas import BlasInfo
from mlx_server.chat.service import ChatService, ModelReport
from mlx_server.dialects import (
    anthropic_messages,
    models,
    ollama,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_responses,
)
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.edge.errors import ErrorShapes, install_error_handlers, report_unexpected_error
from mlx_server.edge.guards import (
    AUTHENTICATED,
    ApiKeyGuard,
    BodySizeLimit,
    HostGuard,
    InFlight,
    ModelControlGuard,
    QueueLimit,
    allowed_hosts,
    model_control_refusal,
)
from mlx_server.edge.metrics import CONTENT_TYPE_LATEST, LiveStats, Metrics, MetricsMiddleware
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.settings import Settings
from mlx_server.vocabulary import EngineStats, ModelLoadingError
from utils_logging import request_context

__all__ = ["GENERATION_PATHS", "ServedModels", "ServerState", "create_app"]

MAX_CAPTURED_BODY_BYTES = 256 * 1024
GENERATION_PATHS = frozenset(
    {
        openai_chat.CHAT_COMPLETIONS_PATH,
        anthropic_messages.MESSAGES_PATH,
        openai_responses.RESPONSES_PATH,
        openai_completions.COMPLETIONS_PATH,
        openai_embeddings.EMBEDDINGS_PATH,
        *ollama.GENERATION_PATHS,
    }
)
ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/v1/cache",
    "/v1/models",
    models.LOAD_PATH,
    models.UNLOAD_PATH,
    anthropic_messages.COUNT_TOKENS_PATH,
    *GENERATION_PATHS,
    *ollama.DESCRIBING_PATHS,
}


class ServedModels(ModelDirectory, Protocol):
    """The model directory, and what the edge reads of it beyond the dialects' needs."""

    def loaded(self) -> dict[str, ChatService | EmbeddingService]:
        """The loaded models' services, by name."""
        ...

    def on_load(self, callback: Callable[[str, ChatService | EmbeddingService], None]) -> None:
        """Call ``callback(name, service)`` for every model loaded now and from now on."""
        ...

    def start_watching(self) -> None:
        """Begin unloading idle models (on the serving event loop)."""
        ...


@dataclass
class ServerState:
    """What the routes share: settings, the BLAS in use, and the served models (None while loading)."""

    settings: Settings
    blas: BlasInfo
    models: ServedModels | None = None
    started_at: float = field(default_factory=time.monotonic)
    failure: Callable[[], str | None] = lambda: None  # why the models can no longer run (a distributed rank stopped)

    def directory(self) -> ServedModels:
        """The served models; ModelLoadingError while the server is still starting."""
        if self.models is None:
            raise ModelLoadingError()
        return self.models

    def chat_services(self) -> dict[str, ChatService]:
        """The loaded chat models' services, by name, the default first."""
        if self.models is None:
            return {}
        return {name: service for name, service in self.models.loaded().items() if isinstance(service, ChatService)}

    def live_stats(self) -> list[tuple[str, LiveStats]]:
        """Each loaded chat model's batch and cache figures, for /metrics."""
        reports = [(name, service.report()) for name, service in self.chat_services().items()]
        return [(name, LiveStats(report.engine, report.prompt_cache, report.answers)) for name, report in reports]


class RequestContextMiddleware:
    """Binds a request id to every log line of a request, and is the last line of defence.

    It keeps the first 256 KiB of the body for error reports, adds
    ``x-request-id`` and ``request-id`` headers (Anthropic's SDK reads the
    latter), and turns any exception that escaped the routes into a 500 in the
    route's dialect (with a debug file), so the server keeps serving and no
    traceback reaches the client.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{secrets.token_hex(8)}"
        captured = bytearray()
        scope.setdefault("state", {})["raw_body"] = captured
        response_started = False

        async def capturing_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(captured) < MAX_CAPTURED_BODY_BYTES:
                captured.extend(message.get("body", b"")[: MAX_CAPTURED_BODY_BYTES - len(captured)])
            return message

        async def send_with_request_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                headers = MutableHeaders(scope=message)
                headers.append("x-request-id", request_id)
                headers.append("request-id", request_id)
            await send(message)

        with request_context(request_id):
            try:
                await self.app(scope, capturing_receive, send_with_request_id)
            except Exception as error:  # noqa: BLE001 - the global handler: report, answer 500, keep serving
                request = Request(scope, capturing_receive)
                response = await report_unexpected_error(request, error)
                if not response_started:
                    await response(scope, capturing_receive, send_with_request_id)


def _server_routes(state: ServerState, metrics: Metrics) -> APIRouter:
    router = APIRouter()

    @router.get("/")
    async def root() -> dict[str, Any]:
        """Whether the server is ready; it needs no key."""
        return {"status": "ok" if state.models is not None else "loading", "service": "mlx-server"}

    @router.head("/")
    async def probe() -> dict[str, Any]:
        """Claude Code probes ``HEAD /`` before its first request; it needs no key."""
        return await root()

    @router.get("/metrics")
    async def metrics_report() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/health")
    async def health(request: Request) -> Response:
        """Readiness for anyone (a load balancer); the details (models, paths, BLAS, figures) with the key.

        The top-level figures are the default chat model's; ``models`` lists every served model.
        """
        served = state.models
        failure = state.failure() or next(
            (f"model {name!r} can no longer generate: {reason}" for name, service in state.chat_services().items()
             if (reason := service.report().failure) is not None), None)  # fmt: skip
        if failure is not None:
            return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
        status_code = 200 if served is not None else 503
        ready = {"status": "ok" if served is not None else "loading"}
        if not request.scope.get("state", {}).get(AUTHENTICATED, False):
            return JSONResponse(ready, status_code=status_code)
        uptime = round(time.monotonic() - state.started_at, 1)
        blas = {"name": state.blas.name, "path": state.blas.path, "optimized": state.blas.optimized}
        if served is None:
            return JSONResponse({**ready, "blas": blas, "uptime_seconds": uptime}, status_code=status_code)
        chat = state.chat_services()
        report: dict[str, Any] = {**ready, "blas": blas, "uptime_seconds": uptime}
        default = chat.get(served.chat_model(""))
        if default is not None:
            report |= _model_report(default)
        report["models"] = [
            {"name": status.name, "kind": status.kind, "state": status.state, "memory_bytes": status.memory_bytes}
            | (_model_report(chat[status.name]) if status.name in chat else {})
            for status in served.describe()
        ]
        return JSONResponse(report)

    @router.get("/v1/cache")
    async def cache_report(model: str | None = None) -> dict[str, Any]:
        """One chat model's prompt and answer caches (the default model unless ``?model=NAME``).

        A GET loads nothing: a model that is not loaded reports its state and no caches.
        """
        directory = state.directory()
        name = directory.chat_model(model or "")
        service = directory.ready(name)
        if not isinstance(service, ChatService):
            status = next(status for status in directory.describe() if status.name == name)
            return {"model": name, "state": status.state, "prompt_cache": None, "response_cache": None}
        report = service.report()
        prompt_cache = {
            **report.prompt_cache.as_dict(),
            "entries_detail": service.cache_entries(),
            "recent_misses": await asyncio.to_thread(service.recent_misses),  # template renders: off the loop
        }
        return {"model": service.name, "state": "loaded", "prompt_cache": prompt_cache,
                "response_cache": _response_cache(report)}  # fmt: skip

    return router


def _response_cache(report: ModelReport) -> dict[str, Any] | None:
    return report.answers.as_dict() if report.answers else None


def _model_report(service: ChatService) -> dict[str, Any]:
    report = service.report()
    stats = report.engine
    return {
        **report.info,
        "queue": {"waiting": stats.waiting, "running": stats.running},
        "batch": _batch_report(stats),
        "prompt_cache": report.prompt_cache.as_dict(),
        "response_cache": _response_cache(report),
    }


def _batch_report(stats: EngineStats) -> dict[str, Any]:
    steps = stats.decode_steps
    report: dict[str, Any] = {
        "running": stats.running,
        "waiting": stats.waiting,
        "max_batch": stats.max_batch,
        "decode_steps": steps,
        "tokens_per_step": round(stats.generated_tokens / steps, 2) if steps else 0.0,
        "kv_active_bytes": stats.active_kv_bytes,
        "kv_budget_bytes": stats.kv_budget_bytes,
        "kv_bytes_per_token": stats.kv_bytes_per_token,
    }
    if stats.drafted_tokens:
        report["speculative"] = {
            "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "acceptance_rate": round(stats.accepted_tokens / stats.drafted_tokens, 3),
        }
    return report


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application; the models may be attached later (health answers 503 until then)."""
    metrics = Metrics(ROUTES, state.live_stats)
    in_flight = InFlight()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.models is not None:
            state.models.start_watching()
        yield

    app = FastAPI(
        title="mlx-server", summary="OpenAI- and Anthropic-compatible MLX inference", docs_url=None, lifespan=lifespan
    )
    app.state.server = state
    shapes = ErrorShapes({anthropic_messages.ERROR_PATH_PREFIX: anthropic_messages.anthropic_error,
                          ollama.ERROR_PATH_PREFIX: ollama.ollama_error})  # fmt: skip
    install_error_handlers(app, shapes)
    if state.models is not None:

        def connect(name: str, service: ChatService | EmbeddingService) -> None:
            """A model that loads reports its completions and batch sizes, and reads the in-flight count."""
            if isinstance(service, ChatService):
                service.observe_completions(lambda stats: metrics.observe(name, stats))
                service.observe_steps(metrics.batch_observer(name))
                service.count_arrivals(in_flight)

        state.models.on_load(connect)

    # Added innermost first: metrics see every response, the request id covers the guards' answers, the Host
    # check comes first, CORS headers reach 401s, a request without the key is refused before its body is read,
    # and unauthenticated requests never take a queue slot.
    app.add_middleware(
        QueueLimit,
        max_waiting=state.settings.max_queue,
        max_batch=state.settings.max_batch,
        paths=GENERATION_PATHS,
        shapes=shapes,
        counter=in_flight,
    )
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_request_bytes, shapes=shapes)
    app.add_middleware(
        ModelControlGuard,
        paths={models.LOAD_PATH, models.UNLOAD_PATH},
        enabled=state.settings.model_control == "on",
        admin_keys=state.settings.admin_keys,
        shapes=shapes,
    )
    app.add_middleware(ApiKeyGuard, keys=state.settings.api_keys, shapes=shapes)
    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key", "Anthropic-Version", "Anthropic-Beta"],
            expose_headers=["X-Request-Id", "Request-Id"],
        )
    hosts = allowed_hosts(state.settings.host, state.settings.allowed_hosts)
    app.add_middleware(HostGuard, hosts=hosts, shapes=shapes)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(_server_routes(state, metrics))
    directory = _Deferred(state)
    keepalive = state.settings.keepalive_interval
    app.include_router(models.build_router(directory, state.started_at))
    app.include_router(openai_chat.build_router(directory, keepalive))
    app.include_router(anthropic_messages.build_router(directory, keepalive))
    app.include_router(openai_responses.build_router(directory, keepalive))
    app.include_router(openai_completions.build_router(directory, keepalive))
    app.include_router(openai_embeddings.build_router(directory))
    settings = state.settings
    control = settings.model_control == "on"
    app.include_router(ollama.build_router(
        directory, lambda request: model_control_refusal(request.headers, control, settings.admin_keys)))  # fmt: skip
    return app


class _Deferred:
    """The directory as the routers see it: the state's, once attached (ModelLoadingError before)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def chat_model(self, requested: str) -> str:
        return self._state.directory().chat_model(requested)

    def embedding_model(self, requested: str) -> str:
        return self._state.directory().embedding_model(requested)

    def ready(self, name: str) -> ChatService | EmbeddingService | None:
        return self._state.directory().ready(name)

    async def chat(self, name: str) -> ChatService:
        return await self._state.directory().chat(name)

    async def embeddings(self, name: str) -> EmbeddingService:
        return await self._state.directory().embeddings(name)

    def describe(self) -> list[Any]:
        return self._state.directory().describe()

    async def load(self, name: str) -> Any:
        return await self._state.directory().load(name)

    async def unload(self, name: str) -> Any:
        return await self._state.directory().unload(name)

    def keep_alive(self, name: str, seconds: float) -> None:
        self._state.directory().keep_alive(name, seconds)
