"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's dialect over the chat core.

Claude Code connects directly (``ANTHROPIC_BASE_URL=http://127.0.0.1:8081``).
Replies are ``message`` objects with ``thinking``, ``text`` and ``tool_use``
blocks; streams follow Anthropic's event sequence (``message_start``, per
block ``content_block_start`` / ``content_block_delta`` /
``content_block_stop``, ``message_delta``, ``message_stop``), with ``ping``
events while the prompt is queued or prefilling, and an ``error`` event for a
failure after the headers.  Usage is counted as Anthropic counts it:
``input_tokens`` is what was neither read from nor written to the prompt
cache, so the prompt's total is the sum of the three input fields.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mlx_server.chat.events import Completion, Finished, Keepalive, ReasoningDelta, TextDelta, ToolCallDelta
from mlx_server.chat.request import ToolCall
from mlx_server.chat.service import ChatRun, ChatService
from mlx_server.dialects.anthropic_protocol import CountTokensRequest, MessagesRequest, anthropic_tool_id
from mlx_server.dialects.common import event_stream, new_id, sse_event
from mlx_server.errors import APIError, ContextOverflowError

__all__ = ["COUNT_TOKENS_PATH", "ERROR_PATH_PREFIX", "MESSAGES_PATH", "anthropic_error", "build_router"]

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
ERROR_PATH_PREFIX = "/v1/messages"
THINKING_SIGNATURE = ""  # thinking is not signed here; Claude Code sends the block back as it got it

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(error: APIError) -> tuple[int, dict[str, Any]]:
    """Anthropic's error shape; a loading model is ``overloaded_error`` (529), which Claude Code retries."""
    status = 529 if error.status == 503 else error.status
    message = error.message
    if isinstance(error, ContextOverflowError):  # Claude Code recognizes this wording and compacts
        message = f"prompt is too long: {error.prompt_tokens} tokens > {error.context_length - 1} maximum"
    elif error.param and error.param not in message:
        message = f"{error.param}: {message}"
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def usage(completion: Completion) -> dict[str, int]:
    stats = completion.stats
    written = min(completion.cache_written_tokens, stats.prompt_tokens - stats.cached_tokens)
    return {
        "input_tokens": stats.prompt_tokens - stats.cached_tokens - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": stats.cached_tokens,
        "output_tokens": stats.completion_tokens,
    }


def _stop(completion: Completion) -> tuple[str, str | None]:
    if completion.stop_sequence is not None:
        return "stop_sequence", completion.stop_sequence
    return _STOP_REASONS.get(completion.finish_reason, "end_turn"), None


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": anthropic_tool_id(call.id),
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def _message(message_id: str, model: str, completion: Completion) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if completion.reasoning:
        content.append({"type": "thinking", "thinking": completion.reasoning, "signature": THINKING_SIGNATURE})
    if completion.text:
        content.append({"type": "text", "text": completion.text})
    content += [_tool_use(call) for call in completion.tool_calls]
    stop_reason, stop_sequence = _stop(completion)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage(completion),
    }


class _BlockWriter:
    """Opens, fills and closes content blocks in Anthropic's event sequence."""

    def __init__(self) -> None:
        self.index = -1
        self.open_kind: str | None = None

    def _event(self, name: str, **fields: Any) -> bytes:
        return sse_event(name, {"type": name, **fields})

    def close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        events = []
        if self.open_kind == "thinking":
            delta = {"type": "signature_delta", "signature": THINKING_SIGNATURE}
            events.append(self._event("content_block_delta", index=self.index, delta=delta))
        self.open_kind = None
        return [*events, self._event("content_block_stop", index=self.index)]

    def text(self, kind: str, text: str) -> list[bytes]:
        """A text or thinking delta, opening a block of that kind first when needed."""
        events = []
        if self.open_kind != kind:
            events += self.close()
            self.index += 1
            self.open_kind = kind
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": ""}
            if kind == "thinking":
                block["signature"] = ""
            events.append(self._event("content_block_start", index=self.index, content_block=block))
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        events.append(self._event("content_block_delta", index=self.index, delta=delta))
        return events

    def tool_use(self, call: ToolCall) -> list[bytes]:
        events = self.close()
        self.index += 1
        block = {**_tool_use(call), "input": {}}
        events.append(self._event("content_block_start", index=self.index, content_block=block))
        delta = {"type": "input_json_delta", "partial_json": call.arguments}
        events.append(self._event("content_block_delta", index=self.index, delta=delta))
        events.append(self._event("content_block_stop", index=self.index))
        return events


async def _stream(run: ChatRun, message_id: str, model: str) -> AsyncIterator[bytes]:
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": run.prompt_tokens, "output_tokens": 0},
    }
    yield sse_event("message_start", {"type": "message_start", "message": start})
    yield sse_event("ping", {"type": "ping"})
    blocks = _BlockWriter()
    try:
        async for event in run.events():
            if isinstance(event, Keepalive):
                yield sse_event("ping", {"type": "ping"})
            elif isinstance(event, TextDelta):
                for chunk in blocks.text("text", event.text):
                    yield chunk
            elif isinstance(event, ReasoningDelta):
                for chunk in blocks.text("thinking", event.text):
                    yield chunk
            elif isinstance(event, ToolCallDelta):
                for chunk in blocks.tool_use(event.call):
                    yield chunk
            elif isinstance(event, Finished):
                for chunk in blocks.close():
                    yield chunk
                stop_reason, stop_sequence = _stop(event.completion)
                delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
                yield sse_event(
                    "message_delta", {"type": "message_delta", "delta": delta, "usage": usage(event.completion)}
                )
                yield sse_event("message_stop", {"type": "message_stop"})
    except APIError as error:  # headers are sent: the failure is an error event, as Anthropic sends it
        yield sse_event("error", anthropic_error(error)[1])


def build_router(service: Callable[[], ChatService]) -> APIRouter:
    """``service`` returns the chat core (APIError 503, answered as 529 here, while the model loads)."""
    router = APIRouter()

    @router.post(MESSAGES_PATH, response_model=None)
    async def messages(body: MessagesRequest, request: Request) -> Response:
        core = service()
        run = core.start(body.to_chat_request(), trace=lambda: body.model_dump(exclude_unset=True))
        message_id = new_id("msg_")
        if body.stream:
            return event_stream(_stream(run, message_id, body.model))
        return JSONResponse(_message(message_id, body.model, await run.complete(request)))

    @router.post(COUNT_TOKENS_PATH)
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        return {"input_tokens": service().count_prompt_tokens(body.to_chat_request())}

    return router
