"""Answering one chat request: as one JSON body, or as server-sent events, with tool calls split out.

Both ways read the same events from the engine (or a cached answer replayed),
report a timeout as OpenAI's error, count the completion in the metrics and
log it the way the integration guide shows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mlx_server import responses
from mlx_server.errors import APIError, error_body
from mlx_server.generation import GenerationStats, TokenEvent
from mlx_server.response_cache import CachedResponse
from mlx_server.schemas import ChatCompletionRequest
from mlx_server.tool_parsing import CallPiece, ContentPiece, ParsedToolCall, ToolCalling
from utils_logging import PerformanceTimer, write_error_debug_file

__all__ = ["KEEPALIVE", "Reply", "complete", "replay", "stream_events", "with_keepalive"]

logger = logging.getLogger("mlx")
KEEPALIVE = b": keep-alive\n\n"


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


async def replay(cached: CachedResponse, prompt_tokens: int) -> AsyncIterator[TokenEvent]:
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
class Reply:
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


async def complete(events: AsyncIterator[TokenEvent], reply: Reply, request: Request) -> Response:
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
        text, calls = reply.tool_calling.parse(text)
    _log_completion(stats, streamed=False, tool_calls=len(calls))
    finish_reason = _finish_reason(stats, len(calls))
    body = responses.completion(reply.completion_id, reply.created, reply.body.model, text, stats, calls, finish_reason)
    return JSONResponse(body)


async def with_keepalive(events: AsyncIterator[TokenEvent], interval: float) -> AsyncIterator[TokenEvent | None]:
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


async def stream_events(events: AsyncIterator[TokenEvent | None], reply: Reply) -> AsyncIterator[bytes]:
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
