"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's dialect over the chat core.

Claude Code connects directly (``ANTHROPIC_BASE_URL=http://127.0.0.1:8081``).
Replies are ``message`` objects with ``thinking``, ``text`` and ``tool_use``
blocks; streams follow Anthropic's event sequence (``message_start``, per
block ``content_block_start`` / ``content_block_delta`` /
``content_block_stop``, ``message_delta``, ``message_stop``; a ``tool_use``
block's input arrives as ``input_json_delta`` pieces while it is written), with ``ping``
events while the prompt is prefilling, and an ``error`` event for a failure
after the headers.  Usage is counted as Anthropic counts it, and is final
from ``message_start`` on: ``input_tokens`` is what was neither read from
nor written to the prompt cache, so the prompt's total is the sum of the
three input fields, in ``message_start`` and ``message_delta`` alike (Claude
Code merges the two).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_server.chat.events import (
    Completion,
    PromptUsage,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallAbandoned,
    ToolCallArguments,
    ToolCallStart,
)
from mlx_server.dialects.anthropic_protocol import CountTokensRequest, MessagesRequest, anthropic_tool_id
from mlx_server.dialects.common import new_id, sse_event, traced
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.errors import APIError
from mlx_server.dialects.lanes import lane_of_headers
from mlx_server.dialects.streaming import SSE, Delta, serve_chat, with_cancellation
from mlx_server.vocabulary import ContextOverflowError, ToolCall

__all__ = [
    "COUNT_TOKENS_PATH",
    "ERROR_PATH_PREFIX",
    "MESSAGES_PATH",
    "MessageStream",
    "anthropic_error",
    "anthropic_usage",
    "build_router",
]

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
    if isinstance(error.cause, ContextOverflowError):  # Claude Code recognizes this wording and compacts
        overflow = error.cause
        message = f"prompt is too long: {overflow.prompt_tokens} tokens > {overflow.context_length - 1} maximum"
    elif error.param and error.param not in message:
        message = f"{error.param}: {message}"
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_usage(prompt: PromptUsage, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage: the three input fields add up to the prompt."""
    return {
        "input_tokens": prompt.uncached_tokens,
        "cache_creation_input_tokens": prompt.cache_written_tokens,
        "cache_read_input_tokens": prompt.cached_tokens,
        "output_tokens": output_tokens,
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
        "usage": anthropic_usage(completion.usage.prompt, completion.usage.completion_tokens),
    }


class MessageStream:
    """One reply's Anthropic events: the message's start, its blocks opened, filled and closed, its end.

    ``whole`` is the same reply as one ``message`` object.
    """

    keepalive = sse_event("ping", {"type": "ping"})
    media_type = SSE

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.index = -1
        self.open_kind: str | None = None

    def whole(self, completion: Completion) -> dict[str, Any]:
        return _message(self.message_id, self.model, completion)

    def _event(self, name: str, **fields: Any) -> bytes:
        return sse_event(name, {"type": name, **fields})

    def start(self, started: Started) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": anthropic_usage(started.usage, 0),
        }
        return [self._event("message_start", message=message), self.keepalive]

    def delta(self, delta: Delta) -> list[bytes]:
        if isinstance(delta, TextDelta):
            return self._text("text", delta.text)
        if isinstance(delta, ReasoningDelta):
            return self._text("thinking", delta.text)
        if isinstance(delta, ToolCallStart):
            events = self._close()
            self.index += 1
            self.open_kind = "tool_use"
            block = {"type": "tool_use", "id": anthropic_tool_id(delta.id), "name": delta.name, "input": {}}
            return [*events, self._event("content_block_start", index=self.index, content_block=block)]
        if isinstance(delta, ToolCallArguments):
            json_delta = {"type": "input_json_delta", "partial_json": delta.text}
            return [self._event("content_block_delta", index=self.index, delta=json_delta)]
        if isinstance(delta, ToolCallAbandoned) or delta.streamed:
            return self._close()
        return self._tool_use(delta.call)

    def finish(self, completion: Completion) -> list[bytes]:
        stop_reason, stop_sequence = _stop(completion)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        usage = anthropic_usage(completion.usage.prompt, completion.usage.completion_tokens)
        return [
            *self._close(),
            self._event("message_delta", delta=delta, usage=usage),
            self._event("message_stop"),
        ]

    def error(self, error: APIError) -> list[bytes]:
        return [sse_event("error", anthropic_error(error)[1])]

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        events = []
        if self.open_kind == "thinking":
            delta = {"type": "signature_delta", "signature": THINKING_SIGNATURE}
            events.append(self._event("content_block_delta", index=self.index, delta=delta))
        self.open_kind = None
        return [*events, self._event("content_block_stop", index=self.index)]

    def _text(self, kind: str, text: str) -> list[bytes]:
        """A text or thinking delta, opening a block of that kind first when needed."""
        events = []
        if self.open_kind != kind:
            events += self._close()
            self.index += 1
            self.open_kind = kind
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": ""}
            if kind == "thinking":
                block["signature"] = ""
            events.append(self._event("content_block_start", index=self.index, content_block=block))
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        events.append(self._event("content_block_delta", index=self.index, delta=delta))
        return events

    def _tool_use(self, call: ToolCall) -> list[bytes]:
        events = self._close()
        self.index += 1
        block = {**_tool_use(call), "input": {}}
        events.append(self._event("content_block_start", index=self.index, content_block=block))
        delta = {"type": "input_json_delta", "partial_json": call.arguments}
        events.append(self._event("content_block_delta", index=self.index, delta=delta))
        events.append(self._event("content_block_stop", index=self.index))
        return events


def build_router(models: ModelDirectory, keepalive: float) -> APIRouter:
    """Routed by the request's model (a model that is still loading is answered as 529 here: Claude Code retries)."""
    router = APIRouter()

    @router.post(MESSAGES_PATH, response_model=None)
    @with_cancellation
    async def messages(body: MessagesRequest, request: Request) -> Response:
        chat_request = body.to_chat_request(lane_of_headers(request.headers))
        reply = functools.partial(MessageStream, new_id("msg_"))
        return await serve_chat(models, body.model, chat_request, body.stream, reply, keepalive, lambda: traced(body))

    @router.post(COUNT_TOKENS_PATH)
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        service = await models.chat(models.chat_model(body.model))
        return {"input_tokens": await service.count_prompt_tokens(body.to_chat_request())}

    return router
