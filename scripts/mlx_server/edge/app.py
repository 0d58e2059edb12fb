"""The HTTP application: the middleware stack, the dialect routers over one chat core, and the server's own routes.

Each API dialect is one module under ``dialects`` with a router that only
translates (OpenAI chat completions, responses and legacy completions;
Anthropic messages).  They share one ``ChatService``, which owns every request
from messages to events.  Errors answer in the dialect of the path they came in on.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.blas import BlasInfo
from mlx_server.chat.answer_cache import AnswerCache
from mlx_server.chat.service import ChatService, ServiceOptions
from mlx_server.dialects import anthropic_messages, models, openai_chat, openai_completions, openai_responses
from mlx_server.edge.errors import ErrorShapes, install_error_handlers, report_unexpected_error
from mlx_server.edge.guards import AUTHENTICATED, ApiKeyGuard, BodySizeLimit, InFlight, QueueLimit
from mlx_server.edge.metrics import CONTENT_TYPE_LATEST, LiveStats, Metrics, MetricsMiddleware
from mlx_server.settings import Settings
from mlx_server.vocabulary import Engine, EngineStats, GenerationStats, ModelLoadingError, Sampling
from utils_logging import request_context

__all__ = ["GENERATION_PATHS", "ServedEngine", "ServerState", "create_app", "service_options"]

MAX_CAPTURED_BODY_BYTES = 256 * 1024
GENERATION_PATHS = frozenset(
    {
        openai_chat.CHAT_COMPLETIONS_PATH,
        anthropic_messages.MESSAGES_PATH,
        openai_responses.RESPONSES_PATH,
        openai_completions.COMPLETIONS_PATH,
    }
)
ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/v1/cache",
    "/v1/models",
    anthropic_messages.COUNT_TOKENS_PATH,
    *GENERATION_PATHS,
}


class ServedEngine(Engine, Protocol):
    """What the edge reads of the engine beyond the chat core's needs: /health, /v1/cache and /metrics."""

    @property
    def max_batch(self) -> int: ...

    @property
    def model_info(self) -> dict[str, Any]: ...

    def cache_stats(self) -> Any: ...

    def cache_entries(self) -> list[dict[str, Any]]: ...

    def observe_steps(self, observer: Callable[[int], None]) -> None: ...

    def count_arrivals(self, in_flight: Callable[[], int]) -> None: ...


def service_options(settings: Settings) -> ServiceOptions:
    return ServiceOptions(
        default_max_tokens=settings.default_max_tokens,
        default_sampling=Sampling(
            temperature=settings.default_temperature, repetition_penalty=settings.default_repetition_penalty
        ),
        keep_billing_header=settings.keep_billing_header,
        request_timeout=settings.request_timeout,
        keepalive_interval=settings.keepalive_interval,
        strict_max_tokens=settings.strict_max_tokens,
    )


@dataclass
class ServerState:
    """What the routes share: settings, the BLAS in use, the engine (None while loading) and its chat service.

    The start-up attaches the service it built (with the model's profile);
    without one, the first request builds it from the engine.
    """

    settings: Settings
    blas: BlasInfo
    engine: ServedEngine | None = None
    answers: AnswerCache | None = None
    started_at: float = field(default_factory=time.monotonic)
    _service: ChatService | None = None
    _observers: list[Callable[[GenerationStats], None]] = field(default_factory=list)

    def attach(self, service: ChatService) -> None:
        self._service = service
        service.observers.extend(self._observers)

    def observe(self, observer: Callable[[GenerationStats], None]) -> None:
        """Have ``observer`` see every finished completion's stats (the metrics)."""
        self._observers.append(observer)
        if self._service is not None:
            self._service.observers.append(observer)

    def service(self) -> ChatService:
        """The chat core; ModelLoadingError while the model is still loading."""
        if self.engine is None:
            raise ModelLoadingError()
        if self._service is None:
            self.attach(ChatService(self.engine, service_options(self.settings), self.answers))
        assert self._service is not None
        return self._service

    def live_stats(self) -> LiveStats | None:
        """Batch and cache figures for /metrics (None while loading)."""
        if self.engine is None:
            return None
        answers = self.answers.stats() if self.answers else None
        return LiveStats(self.engine.stats(), self.engine.cache_stats(), answers)


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

    @router.api_route("/", methods=["GET", "HEAD"])
    async def root() -> dict[str, Any]:
        """Claude Code probes ``HEAD /`` before its first request; it needs no key."""
        return {"status": "ok" if state.engine is not None else "loading", "service": "mlx-server"}

    @router.get("/metrics")
    async def metrics_report() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/health")
    async def health(request: Request) -> Response:
        """Readiness for anyone (a load balancer); the details (model, paths, BLAS, figures) with the key."""
        engine = state.engine
        status_code = 200 if engine is not None else 503
        ready = {"status": "ok" if engine is not None else "loading"}
        if not request.scope.get("state", {}).get(AUTHENTICATED, False):
            return JSONResponse(ready, status_code=status_code)
        uptime = round(time.monotonic() - state.started_at, 1)
        blas = {"name": state.blas.name, "path": state.blas.path, "optimized": state.blas.optimized}
        if engine is None:
            return JSONResponse({**ready, "blas": blas, "uptime_seconds": uptime}, status_code=status_code)
        stats = engine.stats()
        return JSONResponse(
            {
                **ready,
                **engine.model_info,
                "blas": blas,
                "uptime_seconds": uptime,
                "queue": {"waiting": stats.waiting, "running": stats.running},
                "batch": _batch_report(stats),
                "prompt_cache": engine.cache_stats().as_dict(),
                "response_cache": state.answers.stats().as_dict() if state.answers else None,
            }
        )

    @router.get("/v1/cache")
    async def cache_report() -> dict[str, Any]:
        service = state.service()
        engine = state.engine
        assert engine is not None  # service() raises while loading
        prompt_cache = {
            **engine.cache_stats().as_dict(),
            "entries_detail": engine.cache_entries(),
            "recent_misses": await asyncio.to_thread(service.recent_misses),  # template renders: off the loop
        }
        response_cache = state.answers.stats().as_dict() if state.answers else None
        return {"prompt_cache": prompt_cache, "response_cache": response_cache}

    return router


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
    """The FastAPI application; the engine may be attached later (health answers 503 until then)."""
    app = FastAPI(title="mlx-server", summary="OpenAI- and Anthropic-compatible MLX inference", docs_url=None)
    app.state.server = state
    app.state.model_name = "loading"
    shapes = ErrorShapes({anthropic_messages.ERROR_PATH_PREFIX: anthropic_messages.anthropic_error})
    install_error_handlers(app, shapes)
    metrics = Metrics(ROUTES, state.live_stats)
    state.observe(metrics.observe)
    if state.engine is not None:
        state.engine.observe_steps(metrics.batch_size.observe)
    service = state.service

    def model_name() -> str:
        if state.engine is None:
            raise ModelLoadingError()
        return str(state.engine.model_info["model"])

    # Added innermost first: metrics see every response, the request id covers the guards' answers,
    # CORS headers reach 401s, and unauthenticated requests never take a queue slot.
    max_batch = state.engine.max_batch if state.engine is not None else state.settings.max_batch
    in_flight = InFlight()
    if state.engine is not None:
        state.engine.count_arrivals(in_flight)
    app.add_middleware(
        QueueLimit,
        max_waiting=state.settings.max_queue,
        max_batch=max_batch,
        paths=GENERATION_PATHS,
        shapes=shapes,
        counter=in_flight,
    )
    app.add_middleware(ApiKeyGuard, keys=state.settings.api_keys, shapes=shapes)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_request_bytes, shapes=shapes)
    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key", "Anthropic-Version", "Anthropic-Beta"],
            expose_headers=["X-Request-Id", "Request-Id"],
        )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(_server_routes(state, metrics))
    app.include_router(models.build_router(model_name, state.started_at))
    app.include_router(openai_chat.build_router(service))
    app.include_router(anthropic_messages.build_router(service))
    app.include_router(openai_responses.build_router(service))
    app.include_router(openai_completions.build_router(service))
    return app
