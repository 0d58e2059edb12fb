"""How every dialect's route answers: wait for admission, then stream through one driver or reply once.

A dialect supplies a ``StreamEncoder`` (its start, its deltas, its finish and
its in-stream error) and a function that builds its whole reply; ``respond``
and the driver do the rest, the same way for all of them:

* the request is admitted first (``ChatRun.begin``), so a refusal before the
  first token (a KV budget it cannot fit, a grammar that cannot run) is a
  plain error response, and the prompt's usage is final when the response
  starts: Anthropic's ``message_start`` carries the same numbers as its
  ``message_delta``;
* response headers tell the client what the prompt cache gave it (``x-prompt-cache-*``);
* keep-alives: an SSE comment before the dialect's start event, the
  dialect's own (an Anthropic ``ping``) after it;
* cancellation: a client that goes away stops generation, whether it was
  streaming (Starlette cancels the driver) or waiting for a whole reply
  (``with_cancellation``, vLLM's pattern);
* a failure after the headers are sent is the dialect's error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mlx_server.chat.events import (
    Completion,
    Finished,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallAbandoned,
    ToolCallArguments,
    ToolCallDelta,
    ToolCallStart,
)
from mlx_server.chat.request import ChatRequest
from mlx_server.chat.service import ChatRun, ChatService
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.errors import APIError, http_error
from mlx_server.vocabulary import ServerError

__all__ = [
    "SSE",
    "SSE_KEEPALIVE",
    "ChatReply",
    "StreamEncoder",
    "cache_headers",
    "encode_stream",
    "event_stream",
    "respond",
    "serve_chat",
    "with_cancellation",
    "with_keepalives",
]

SSE_KEEPALIVE = b": keep-alive\n\n"
SSE = "text/event-stream"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Delta = Union[TextDelta, ReasoningDelta, ToolCallStart, ToolCallArguments, ToolCallDelta, ToolCallAbandoned]
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
Item = TypeVar("Item")


class _Silence:
    """What ``with_keepalives`` yields when its source has said nothing for a while."""


SILENCE = _Silence()


class StreamEncoder(Protocol):
    """One dialect's server-sent events for one reply."""

    keepalive: bytes  # what a silence is filled with once the stream has started
    media_type: str  # of the stream: SSE, or NDJSON (Ollama's)

    def start(self, started: Started) -> Iterable[bytes]: ...
    def delta(self, delta: Delta) -> Iterable[bytes]: ...
    def finish(self, completion: Completion) -> Iterable[bytes]: ...
    def error(self, error: APIError) -> Iterable[bytes]: ...


class ChatReply(StreamEncoder, Protocol):
    """A dialect's reply to one request: its stream events, or the whole reply at once."""

    def whole(self, completion: Completion) -> dict[str, Any]: ...


async def with_keepalives(source: AsyncIterator[Item], seconds: float) -> AsyncGenerator[Item | _Silence, None]:
    """``source``'s items, and ``SILENCE`` whenever ``seconds`` pass without one (0: never).

    The read in progress is never cancelled by a silence, so nothing is lost.
    """
    pending: asyncio.Future[Item] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait((pending,), timeout=seconds or None)
            if not done:
                yield SILENCE
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending


async def serve_chat(
    models: ModelDirectory,
    requested: str,
    request: ChatRequest,
    stream: bool,
    reply: Callable[[str], ChatReply],
    keepalive: float,
    trace: Callable[[], Any] | None = None,
) -> Response:
    """Route a chat request to its model, start it, and answer (``respond``).

    ``reply`` makes the dialect's reply for the served model's name (what its
    ``model`` field says).  A streamed request to a model that is not loaded
    gets its response at once and keep-alives while the model loads, so the
    client neither times out nor is lost; a failure from there on is the
    dialect's in-stream error.
    """
    name = models.chat_model(requested)
    answer = reply(name)
    ready = models.ready(name)
    if ready is None and stream:
        return event_stream(_after_loading(models.chat(name), request, answer, keepalive, trace), answer.media_type)
    service = ready if isinstance(ready, ChatService) else await models.chat(name)
    return await respond(await service.start(request, trace), stream, answer, keepalive)


async def _after_loading(
    loading: Awaitable[ChatService],
    request: ChatRequest,
    answer: ChatReply,
    keepalive: float,
    trace: Callable[[], Any] | None,
) -> AsyncIterator[bytes]:
    """SSE keep-alives until the model is loaded and the request prepared, then the reply's stream."""

    async def started() -> ChatRun:
        return await (await loading).start(request, trace)

    task = asyncio.ensure_future(started())
    try:
        while not task.done():
            await asyncio.wait((task,), timeout=keepalive or None)
            if not task.done():
                yield SSE_KEEPALIVE
        run = task.result()
    except ServerError as error:
        for chunk in answer.error(http_error(error)):
            yield chunk
        return
    finally:
        if not task.done():
            task.cancel()
    async for chunk in encode_stream(run, answer, keepalive):
        yield chunk


async def encode_stream(run: ChatRun, encoder: StreamEncoder, keepalive: float) -> AsyncIterator[bytes]:
    """The driver: the run's events as the encoder's bytes, keep-alives in its silences (an SSE comment before
    the dialect's start event, the dialect's own after it); a failure becomes the encoder's error event."""
    started = False
    events = run.events()
    paced = with_keepalives(events, keepalive)
    try:
        if run.started is None and keepalive:
            yield SSE_KEEPALIVE  # ``respond`` already waited one interval for the admission
        async for event in paced:
            if isinstance(event, _Silence):
                yield encoder.keepalive if started else SSE_KEEPALIVE
                continue
            if isinstance(event, Started):
                started = True
                chunks = encoder.start(event)
            elif isinstance(event, Finished):
                chunks = encoder.finish(event.completion)
            else:
                chunks = encoder.delta(event)
            for chunk in chunks:
                yield chunk
    except ServerError as error:  # the headers are sent: the failure is reported in-stream
        for chunk in encoder.error(http_error(error)):
            yield chunk
    finally:
        await paced.aclose()  # its read of the run first, then the run itself
        await events.aclose()


def event_stream(
    chunks: AsyncIterator[bytes], media_type: str = SSE, headers: dict[str, str] | None = None
) -> StreamingResponse:
    return StreamingResponse(chunks, media_type=media_type, headers={**STREAM_HEADERS, **(headers or {})})


async def cache_headers(run: ChatRun) -> dict[str, str]:
    """What the prompt cache gave this request, for the client: tokens read and, on a miss, where it diverged.

    Also what the prompt left out of its attachments (``x-attachments-left-out``: images on a text model).

    Empty when the request is still waiting for room in the batch (its usage
    then says the same, at the end).  Working out the message takes template
    renders, so it runs off the event loop.
    """
    started = run.started
    omitted = {"x-attachments-left-out": run.omitted.describe()} if run.omitted else {}
    if started is None:
        return omitted
    lookup = started.lookup
    headers = {"x-prompt-cache-read-tokens": str(lookup.cached_tokens), "x-prompt-cache-source": lookup.source}
    headers |= omitted
    if lookup.lane is not None:
        headers["x-prompt-cache-lane"] = str(lookup.lane)[:64]
    explanation = await asyncio.to_thread(run.explain_miss)
    if explanation is not None and explanation.diverged_at_token is not None:
        headers["x-prompt-cache-diverged-at-token"] = str(explanation.diverged_at_token)
        if explanation.diverged_at_message is not None:
            headers["x-prompt-cache-diverged-at-message"] = str(explanation.diverged_at_message)
            headers["x-prompt-cache-diverged-role"] = str(explanation.role)
    return headers


async def respond(run: ChatRun, stream: bool, reply: ChatReply, keepalive: float) -> Response:
    """Admit the request (a stream waits one keep-alive interval at most), then answer with server-sent events
    or one JSON object."""
    await run.begin((keepalive or None) if stream else None)
    headers = await cache_headers(run)
    if stream:
        return event_stream(encode_stream(run, reply, keepalive), reply.media_type, headers)
    return JSONResponse(reply.whole(await run.complete()), headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read already, so the next message says so)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def with_cancellation(handler: Handler) -> Handler:
    """Run a route so that a client who disconnects cancels it (and with it, its generation).

    The route must take the raw ``Request`` as a keyword argument named ``request``.
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        request: Request = kwargs["request"]
        handling = asyncio.ensure_future(handler(*args, **kwargs))
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((handling, watching), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the server is shutting down: stop the handler too
            handling.cancel()
            raise
        finally:
            watching.cancel()
        if handling.done():
            return handling.result()
        handling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handling
        return Response(status_code=499)  # nobody reads it: the client is gone

    return wrapper  # type: ignore[return-value]
