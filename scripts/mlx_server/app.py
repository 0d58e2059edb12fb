"""The HTTP layer: OpenAI-compatible routes over the generation engine.

Each chat request is timed by a ``PerformanceTimer("chat_completion")`` with the
guide's checkpoints (request_parsed, cache_check, prompt_processed,
inference_complete) and logged as the guide shows: "Processing chat request",
then "Chat request completed successfully" with the numbers a user wants.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server import responses
from mlx_server.blas import BlasInfo
from mlx_server.errors import APIError, error_body, install_error_handlers, report_unexpected_error
from mlx_server.generation import GenerationEngine, GenerationStats, SamplingSettings, TokenEvent
from mlx_server.grammar import GrammarError, OutputConstraint, build_grammar
from mlx_server.guards import ApiKeyGuard, BodySizeLimit, QueueLimit
from mlx_server.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from mlx_server.prompts import normalize_billing_header, render_prompt, stable_prefix_length
from mlx_server.response_cache import CachedResponse, ResponseCache
from mlx_server.schemas import ChatCompletionRequest
from mlx_server.settings import Settings
from mlx_server.tool_parsing import (
    HERMES,
    CallPiece,
    ContentPiece,
    ParsedToolCall,
    ToolCalling,
    detect_tool_call_format,
    parse_tool_calls,
)
from mlx_server.tool_prompts import template_tool_support
from utils_logging import PerformanceTimer, debug, request_context, write_error_debug_file

__all__ = ["ServerState", "create_app"]

logger = logging.getLogger("mlx")
MAX_CAPTURED_BODY_BYTES = 256 * 1024
ROUTES = {"/health", "/metrics", "/v1/cache", "/v1/models", "/v1/chat/completions"}
KEEPALIVE = b": keep-alive\n\n"


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


def _log_completion(stats: GenerationStats, streamed: bool, tool_calls: int = 0) -> None:
    if stats.finish_reason == "cancelled":
        logger.info("Chat request cancelled: the client disconnected after %d tokens", stats.completion_tokens)
        return
    logger.info(
        "Chat request completed successfully: %d prompt tokens (%d cached), %d completion tokens, finish_reason=%s, "
        "queue %.0fms, time to first token %.0fms, %.1f tokens/s%s",
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.completion_tokens,
        _finish_reason(stats, tool_calls),
        stats.queue_ms,
        stats.time_to_first_token_ms,
        stats.tokens_per_second,
        (f", {tool_calls} tool call{'s' if tool_calls != 1 else ''}" if tool_calls else "")
        + (", streamed" if streamed else ""),
    )


def _finish_reason(stats: GenerationStats, tool_calls: int) -> str:
    """``tool_calls`` when the model stopped after calling tools, as OpenAI reports it."""
    return "tool_calls" if tool_calls and stats.finish_reason == "stop" else stats.finish_reason


async def _cancel_when_disconnected(request: Request, cancelled: threading.Event) -> None:
    """Set ``cancelled`` when the client goes away (the body is already read, so the next message says so)."""
    while not cancelled.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancelled.set()


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
        return Response(metrics.render(), media_type=CONTENT_TYPE)

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
            prompt = render_prompt(tokenizer, messages, body.tools)
            settings = _sampling_settings(
                body, len(prompt), engine.loaded.context_length, state.settings.default_max_tokens, grammar
            )
            stable_prefix = stable_prefix_length(tokenizer, messages, prompt, body.tools)
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
            events = _replay(cached, len(prompt))
        else:
            timeout = state.settings.request_timeout or None
            events = engine.stream(prompt, settings, cancelled, stable_prefix, timeout=timeout)
        remember = _remember_answer(state.response_cache, answer_key) if cached is None else None
        reply = _Reply(completion_id, created, body, timer, cancelled, remember, tool_calling, metrics.observe)
        if body.stream:
            return StreamingResponse(
                _stream_events(_with_keepalive(events, state.settings.keepalive_interval), reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(events, reply, request)

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


async def _replay(cached: CachedResponse, prompt_tokens: int) -> AsyncIterator[TokenEvent]:
    """A cached answer, delivered like a generation: its text, then its stats (all prompt tokens cached)."""
    yield TokenEvent(cached.text)
    stats = GenerationStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=cached.completion_tokens,
        cached_tokens=prompt_tokens,
        cache_source="response",
        finish_reason=cached.finish_reason,
    )
    yield TokenEvent("", stats=stats)


@dataclass
class _Reply:
    """What every way of answering one request shares."""

    completion_id: str
    created: int
    body: ChatCompletionRequest
    timer: PerformanceTimer
    cancelled: threading.Event
    remember: Callable[[str, GenerationStats], None] | None
    tool_calling: ToolCalling | None = None
    observe: Callable[[GenerationStats], None] = lambda _stats: None

    def chunk(self, delta: dict[str, Any] | None, **extra: Any) -> bytes:
        return responses.sse(responses.chunk(self.completion_id, self.created, self.body.model, delta, **extra))


async def _complete(events: AsyncIterator[TokenEvent], reply: _Reply, request: Request) -> Response:
    watcher = asyncio.create_task(_cancel_when_disconnected(request, reply.cancelled))
    parts: list[str] = []
    stats: GenerationStats | None = None
    try:
        async for event in events:
            if "prompt_processed" not in reply.timer.checkpoints:
                reply.timer.checkpoint("prompt_processed")
            parts.append(event.text)
            stats = event.stats or stats
        reply.timer.checkpoint("inference_complete")
    except BaseException as error:
        reply.timer.stop(error)
        raise
    finally:
        watcher.cancel()
    reply.timer.stop()
    assert stats is not None
    reply.observe(stats)
    if stats.finish_reason == "timeout":
        raise _timed_out(stats)
    text = "".join(parts)
    if reply.remember is not None:
        reply.remember(text, stats)
    calls: list[ParsedToolCall] = []
    if reply.tool_calling is not None:
        text, calls = parse_tool_calls(
            text, reply.tool_calling.call_format, reply.tool_calling.allowed_names, reply.tool_calling.parallel
        )
    _log_completion(stats, streamed=False, tool_calls=len(calls))
    finish_reason = _finish_reason(stats, len(calls))
    body = responses.completion(reply.completion_id, reply.created, reply.body.model, text, stats, calls, finish_reason)
    return JSONResponse(body)


async def _with_keepalive(events: AsyncIterator[TokenEvent], interval: float) -> AsyncIterator[TokenEvent | None]:
    """The events, with a None whenever ``interval`` seconds pass without one (0: never).

    A long prefill, or a wait behind other requests, sends nothing for a
    while; clients and proxies with read timeouts then hang up.  Each None
    becomes an SSE comment line, which clients ignore.
    """
    iterator = events.__aiter__()
    pending: asyncio.Future[TokenEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval or None)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


def _timed_out(stats: GenerationStats) -> APIError:
    return APIError(
        504,
        f"the request ran past the server's --request-timeout and was stopped after {stats.completion_tokens} "
        "generated tokens; raise the timeout or lower max_tokens",
        error_type="server_error",
        code="request_timeout",
    )


async def _stream_events(events: AsyncIterator[TokenEvent | None], reply: _Reply) -> AsyncIterator[bytes]:
    """OpenAI's wire format: role delta, content deltas as generated, finish chunk, usage chunk, [DONE]."""
    failure: BaseException | None = None
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        stats: GenerationStats | None = None
        parts: list[str] = []
        extractor = reply.tool_calling.extractor() if reply.tool_calling is not None else None
        async for event in events:
            if event is None:
                yield KEEPALIVE
                continue
            if "prompt_processed" not in reply.timer.checkpoints:
                reply.timer.checkpoint("prompt_processed")
            if event.text:
                parts.append(event.text)
                if extractor is None:
                    yield reply.chunk({"content": event.text})
                else:
                    for delta in _deltas(extractor.feed(event.text), extractor.calls):
                        yield reply.chunk(delta)
            stats = event.stats or stats
        assert stats is not None
        reply.observe(stats)
        if stats.finish_reason == "timeout":
            timed_out = _timed_out(stats)
            logger.warning("Chat stream stopped: %s", timed_out.message)
            yield responses.sse(error_body(timed_out.message, timed_out.error_type, code=timed_out.code))
            return
        if extractor is not None:
            for delta in _deltas(extractor.finish(), extractor.calls):
                yield reply.chunk(delta)
        calls = len(extractor.calls) if extractor is not None else 0
        reply.timer.checkpoint("inference_complete")
        yield reply.chunk({}, finish_reason=_finish_reason(stats, calls))
        if reply.body.include_usage_in_stream():
            yield reply.chunk(None, stats=stats)
        yield responses.DONE
        if reply.remember is not None:
            reply.remember("".join(parts), stats)
        _log_completion(stats, streamed=True, tool_calls=calls)
    except (asyncio.CancelledError, GeneratorExit) as error:
        failure = error
        logger.info("Chat request cancelled: the client disconnected during the stream")
        raise
    except Exception as error:  # headers are sent: the failure is reported in-stream, as OpenAI does
        failure = error
        write_error_debug_file(
            500, {"stream": True, "model": reply.body.model}, {"statusCode": 500, "body": repr(error)}
        )
        logger.error("Chat stream failed: %s: %s", type(error).__name__, error, exc_info=error)
        body = error_body("the server hit an internal error during the stream", "server_error", code="internal_error")
        yield responses.sse(body)
    finally:
        reply.cancelled.set()
        reply.timer.stop(failure)


def _deltas(pieces: list[ContentPiece | CallPiece], calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    """Stream deltas for content and for whole tool calls (each call's index is its place among the calls)."""
    deltas: list[dict[str, Any]] = []
    for piece in pieces:
        if isinstance(piece, ContentPiece):
            deltas.append({"content": piece.text})
        else:
            deltas += responses.tool_call_deltas(calls.index(piece.call), piece.call)
    return deltas
