"""The HTTP layer: OpenAI-compatible routes over the generation engine.

Each chat request is timed by a ``PerformanceTimer("chat_completion")`` with the
guide's checkpoints (request_parsed, cache_check, prompt_processed,
inference_complete) and logged as the guide shows: "Processing chat request",
then "Chat request completed successfully" with the numbers a user wants.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.blas import BlasInfo
from mlx_server.errors import APIError, install_error_handlers, report_unexpected_error
from mlx_server.generation import GenerationEngine, GenerationStats, SamplingSettings
from mlx_server.grammar import GrammarError, OutputConstraint, build_grammar
from mlx_server.guards import ApiKeyGuard, BodySizeLimit, QueueLimit
from mlx_server.metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from mlx_server.prompts import normalize_billing_header, render_prompt_with_prefix
from mlx_server.replies import Reply, complete, replay, stream_events, with_keepalive
from mlx_server.response_cache import CachedResponse, ResponseCache
from mlx_server.schemas import ChatCompletionRequest
from mlx_server.settings import Settings
from mlx_server.tool_parsing import (
    HERMES,
    ToolCalling,
    detect_tool_call_format,
)
from mlx_server.tool_prompts import template_tool_support
from utils_logging import PerformanceTimer, debug, request_context

__all__ = ["ServerState", "create_app"]

logger = logging.getLogger("mlx")
MAX_CAPTURED_BODY_BYTES = 256 * 1024
ROUTES = {"/health", "/metrics", "/v1/cache", "/v1/models", "/v1/chat/completions"}


@dataclass
class ServerState:
    """What the routes share: settings, the BLAS in use, and the engine (None while loading)."""

    settings: Settings
    blas: BlasInfo
    engine: GenerationEngine | None = None
    response_cache: ResponseCache | None = None
    started_at: float = field(default_factory=time.monotonic)

    def live_stats(self) -> dict[str, Any] | None:
        """Queue and cache figures for /metrics (None while loading)."""
        if self.engine is None:
            return None
        return {
            "queue": self.engine.queue_depth,
            "prompt_cache": self.engine.kv_cache.stats(),
            "response_cache": self.response_cache.stats() if self.response_cache else None,
        }


class RequestContextMiddleware:
    """Binds a request id to every log line of a request, and is the last line of defence.

    It keeps the first 256 KiB of the body for error reports, adds an
    ``x-request-id`` header, and turns any exception that escaped the routes
    into a 500 in OpenAI's shape (with a debug file), so the server keeps
    serving and no traceback reaches the client.
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
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        with request_context(request_id):
            try:
                await self.app(scope, capturing_receive, send_with_request_id)
            except Exception as error:  # noqa: BLE001 - the global handler: report, answer 500, keep serving
                request = Request(scope, capturing_receive)
                response = await report_unexpected_error(request, error)
                if not response_started:
                    await response(scope, capturing_receive, send_with_request_id)


def _engine(state: ServerState) -> GenerationEngine:
    if state.engine is None:
        raise APIError(
            503, "the model is still loading; retry shortly", error_type="server_error", code="model_loading"
        )
    return state.engine


def _output_rules(body: ChatCompletionRequest, engine: GenerationEngine) -> tuple[str | None, ToolCalling | None]:
    """The grammar the output must follow (None: free) and how to find tool calls in it (None: do not look)."""
    mode = body.tool_mode()
    constraint = OutputConstraint(
        tools=tuple(body.tools or ()),
        tool_mode=mode,
        forced_function=body.forced_function(),
        parallel_calls=body.parallel_tool_calls,
        json_schema=body.response_format.output_schema() if body.response_format else None,
    )
    try:
        grammar = build_grammar(constraint)
        if grammar is not None:
            engine.grammar_tokenizer.get()
    except GrammarError as error:
        raise APIError(400, str(error), param=error.param, code="invalid_schema") from error
    if mode == "none":
        return grammar, None
    tokenizer = engine.loaded.tokenizer
    call_format = detect_tool_call_format(tokenizer) if template_tool_support(tokenizer).tools else HERMES
    names = frozenset(tool.function.name for tool in body.tools or ())
    return grammar, ToolCalling(call_format, names, body.parallel_tool_calls)


def _sampling_settings(
    body: ChatCompletionRequest, prompt_length: int, context_length: int, default_max: int, grammar: str | None
) -> SamplingSettings:
    """Validate lengths against the context and fill in defaults."""
    room = context_length - prompt_length
    requested = body.requested_max_tokens()
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if room < 1 or (requested is not None and requested > room):
        asked = f" plus {requested} completion tokens" if requested is not None else ""
        raise APIError(
            400,
            f"this model's context is {context_length} tokens; the prompt has {prompt_length}{asked}. "
            "Shorten the messages or lower max_tokens.",
            param="messages" if room < 1 else param,
            code="context_length_exceeded",
        )
    return SamplingSettings(
        max_tokens=requested if requested is not None else min(default_max, room),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(body.stop_sequences()),
        grammar=grammar,
    )


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application; the engine may be attached later (health answers 503 until then)."""
    app = FastAPI(title="mlx-server", summary="OpenAI-compatible MLX inference", docs_url=None, redoc_url=None)
    app.state.server = state
    app.state.model_name = "loading"
    install_error_handlers(app)
    metrics = Metrics(ROUTES, state.live_stats)
    # Added innermost first: metrics see every response, the request id covers the guards' answers,
    # CORS headers reach 401s, and unauthenticated requests never take a queue slot.
    app.add_middleware(QueueLimit, max_waiting=state.settings.max_queue)
    app.add_middleware(ApiKeyGuard, keys=state.settings.api_keys)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_request_bytes)
    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Api-Key"],
            expose_headers=["X-Request-Id"],
        )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics")
    async def metrics_report() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> Response:
        uptime = round(time.monotonic() - state.started_at, 1)
        blas = {"name": state.blas.name, "path": state.blas.path, "optimized": state.blas.optimized}
        if state.engine is None:
            return JSONResponse({"status": "loading", "blas": blas, "uptime_seconds": uptime}, status_code=503)
        loaded = state.engine.loaded
        return JSONResponse(
            {
                "status": "ok",
                "model": loaded.name,
                "model_source": loaded.source,
                "model_kind": loaded.kind,
                "quantized": loaded.quantized,
                "device": loaded.device,
                "blas": blas,
                "context_length": loaded.context_length,
                "uptime_seconds": uptime,
                "queue": state.engine.queue_depth,
                "prompt_cache": state.engine.kv_cache.stats(),
                "response_cache": state.response_cache.stats() if state.response_cache else None,
            }
        )

    @app.get("/v1/cache")
    async def cache_report() -> dict[str, Any]:
        engine = _engine(state)
        return {
            "prompt_cache": {**engine.kv_cache.stats(), "entries_detail": engine.kv_cache.describe_entries()},
            "response_cache": state.response_cache.stats() if state.response_cache else None,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        loaded = _engine(state).loaded
        return {"object": "list", "data": [_model_card(loaded.name, state)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        loaded = _engine(state).loaded
        if model_id != loaded.name:
            raise APIError(
                404,
                f"model {model_id!r} is not served here (this server serves {loaded.name!r})",
                param="model",
                code="model_not_found",
            )
        return _model_card(loaded.name, state)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = _engine(state)
        timer = PerformanceTimer("chat_completion").start()
        try:
            logger.info("Processing chat request")
            debug(3, "Chat request", lambda: body.model_dump(exclude_unset=True))
            body.check_supported()
            timer.checkpoint("request_parsed")
            messages = body.messages
            if not state.settings.keep_billing_header:
                messages, removed = normalize_billing_header(messages)
                if removed:
                    debug(2, "Normalized the volatile billing-header line", {"lines_removed": removed})
            tokenizer = engine.loaded.tokenizer
            grammar, tool_calling = _output_rules(body, engine)
            prompt, stable_prefix = render_prompt_with_prefix(tokenizer, messages, body.tools)
            settings = _sampling_settings(
                body, len(prompt), engine.loaded.context_length, state.settings.default_max_tokens, grammar
            )
            answer_key, cached = _look_up_answer(state.response_cache, prompt, settings)
            timer.checkpoint("cache_check")
            debug(
                2,
                "Generation settings",
                lambda: {
                    "prompt_tokens": len(prompt),
                    "stable_prefix": stable_prefix,
                    "tool_calls": "off" if tool_calling is None else tool_calling.call_format.name,
                    **settings.__dict__,
                    "grammar": "none" if grammar is None else f"{len(grammar)} characters",
                },
            )
        except BaseException as error:
            timer.stop(error)
            raise
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        cancelled = threading.Event()
        if cached is not None:
            events = replay(cached, len(prompt))
        else:
            timeout = state.settings.request_timeout or None
            events = engine.stream(prompt, settings, cancelled, stable_prefix, timeout=timeout)
        remember = _remember_answer(state.response_cache, answer_key) if cached is None else None
        reply = Reply(completion_id, created, body, timer, cancelled, remember, tool_calling, metrics.observe)
        if body.stream:
            return StreamingResponse(
                stream_events(with_keepalive(events, state.settings.keepalive_interval), reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(events, reply, request)

    return app


def _model_card(name: str, state: ServerState) -> dict[str, Any]:
    created = int(time.time() - (time.monotonic() - state.started_at))
    return {"id": name, "object": "model", "created": created, "owned_by": "mlx-server"}


def _look_up_answer(
    cache: ResponseCache | None, prompt: list[int], settings: SamplingSettings
) -> tuple[str | None, CachedResponse | None]:
    """Deterministic requests (greedy, or seeded) may be answered from the response cache.

    The key is the rendered prompt (messages, tools and template together) and every sampling setting.
    """
    if cache is None or not cache.max_entries or (settings.temperature > 0 and settings.seed is None):
        return None, None
    shaping = {"prompt": prompt, **settings.__dict__}
    key = cache.key_for(shaping)
    return key, cache.get(key)


def _remember_answer(cache: ResponseCache | None, key: str | None) -> Callable[[str, GenerationStats], None] | None:
    if cache is None or key is None:
        return None

    def remember(text: str, stats: GenerationStats) -> None:
        if stats.finish_reason in ("stop", "length"):
            cache.put(key, CachedResponse(text, stats.finish_reason, stats.prompt_tokens, stats.completion_tokens))

    return remember
