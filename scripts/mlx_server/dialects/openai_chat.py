"""``POST /v1/chat/completions``: OpenAI's chat dialect over the chat core.

Translates the request into a ``ChatRequest``, and the core's events into a
``chat.completion`` object or ``chat.completion.chunk`` server-sent events:
a role delta, content (and ``reasoning_content``) deltas as generated, a
call's id and name then its arguments as they are written, the finish chunk, an optional usage
chunk, ``[DONE]``.  Failures after the headers are sent become an error event.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_server.chat.events import (
    Completion,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallAbandoned,
    ToolCallArguments,
    ToolCallStart,
    Usage,
)
from mlx_server.dialects.common import new_id, sse_data, traced
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.errors import APIError, openai_error_body
from mlx_server.dialects.lanes import lane_of_headers
from mlx_server.dialects.openai_chat_protocol import ChatCompletionRequest
from mlx_server.dialects.streaming import SSE, SSE_KEEPALIVE, Delta, serve_chat, with_cancellation
from mlx_server.vocabulary import ToolCall

__all__ = ["CHAT_COMPLETIONS_PATH", "DONE", "build_router", "openai_usage"]

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"


def openai_usage(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object: the prompt, of which ``cached_tokens`` came from the prompt cache."""
    return {
        "prompt_tokens": usage.prompt.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.prompt.cached_tokens},
    }


def openai_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A call as stream deltas, in OpenAI's shape: id, type and name first, then the arguments."""
    opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [{"tool_calls": [opening]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


class ChatCompletionReply:
    """The objects of one reply (whole, or as chunks), sharing one id and creation time."""

    keepalive = SSE_KEEPALIVE
    media_type = SSE

    def __init__(self, body: ChatCompletionRequest, model: str) -> None:
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.body = body
        self.model = model

    def whole(self, completion: Completion) -> dict[str, Any]:
        """A ``chat.completion``; with tool calls, empty content is ``null`` as OpenAI sends it."""
        calls = completion.tool_calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": completion.text if completion.text or not calls else None,
        }
        if completion.reasoning:
            message["reasoning_content"] = completion.reasoning
        if calls:
            message["tool_calls"] = [openai_tool_call(call) for call in calls]
        choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": openai_usage(completion.usage),
        }

    def chunk(
        self, delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Usage | None = None
    ) -> bytes:
        """A ``chat.completion.chunk``; ``delta=None`` gives the usage chunk (``choices: []``)."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        if delta is None:
            body["choices"] = []
        else:
            body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if usage is not None:
            body["usage"] = openai_usage(usage)
        return sse_data(body)

    # -- the stream encoder --------------------------------------------------------

    def start(self, started: Started) -> list[bytes]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def delta(self, delta: Delta) -> list[bytes]:
        if isinstance(delta, TextDelta):
            return [self.chunk({"content": delta.text})]
        if isinstance(delta, ReasoningDelta):
            return [self.chunk({"reasoning_content": delta.text})]
        if isinstance(delta, ToolCallStart):
            opening = {"index": delta.index, "id": delta.id, "type": "function",
                       "function": {"name": delta.name, "arguments": ""}}  # fmt: skip
            return [self.chunk({"tool_calls": [opening]})]
        if isinstance(delta, ToolCallArguments):
            return [self.chunk({"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]})]
        if isinstance(delta, ToolCallAbandoned) or delta.streamed:
            return []  # its arguments went out as they were written
        return [self.chunk(part) for part in _call_deltas(delta.index, delta.call)]

    def finish(self, completion: Completion) -> list[bytes]:
        chunks = [self.chunk({}, finish_reason=completion.finish_reason)]
        if self.body.include_usage_in_stream():
            chunks.append(self.chunk(None, usage=completion.usage))
        return [*chunks, DONE]

    def error(self, error: APIError) -> list[bytes]:
        return [sse_data(openai_error_body(error.message, error.error_type, error.param, error.code))]


def build_router(models: ModelDirectory, keepalive: float) -> APIRouter:
    """Routed by the request's model."""
    router = APIRouter()

    @router.post(CHAT_COMPLETIONS_PATH, response_model=None)
    @with_cancellation
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        chat_request = body.to_chat_request(lane_of_headers(request.headers))
        reply = functools.partial(ChatCompletionReply, body)
        return await serve_chat(models, body.model, chat_request, body.stream, reply, keepalive, lambda: traced(body))

    return router
