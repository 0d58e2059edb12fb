"""``POST /v1/chat/completions``: OpenAI's chat dialect over the chat core.

Translates the request into a ``ChatRequest``, and the core's events into a
``chat.completion`` object or ``chat.completion.chunk`` server-sent events:
a role delta, content (and ``reasoning_content``) deltas as generated, a
call's id and name then its arguments, the finish chunk, an optional usage
chunk, ``[DONE]``.  Failures after the headers are sent become an error event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mlx_server.chat.events import Completion, Finished, Keepalive, ReasoningDelta, TextDelta, ToolCallDelta
from mlx_server.chat.request import ToolCall
from mlx_server.chat.service import ChatRun, ChatService
from mlx_server.dialects.common import event_stream, new_id, sse_data
from mlx_server.dialects.openai_chat_protocol import ChatCompletionRequest
from mlx_server.errors import APIError, openai_error_body
from mlx_server.generation import GenerationStats

__all__ = ["CHAT_COMPLETIONS_PATH", "KEEPALIVE", "build_router", "usage"]

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def openai_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class _Reply:
    """The ids and echoes one reply's objects share."""

    def __init__(self, body: ChatCompletionRequest) -> None:
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.body = body

    def completion(self, completion: Completion) -> dict[str, Any]:
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
            "model": self.body.model,
            "choices": [choice],
            "usage": usage(completion.stats),
        }

    def chunk(
        self, delta: dict[str, Any] | None, finish_reason: str | None = None, stats: GenerationStats | None = None
    ) -> bytes:
        """A ``chat.completion.chunk``; ``delta=None`` gives the usage chunk (``choices: []``)."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.body.model,
        }
        if delta is None:
            body["choices"] = []
        else:
            body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if stats is not None:
            body["usage"] = usage(stats)
        return sse_data(body)


def _call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A call as stream deltas, in OpenAI's shape: id, type and name first, then the arguments."""
    opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [{"tool_calls": [opening]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


async def _stream(run: ChatRun, reply: _Reply) -> AsyncIterator[bytes]:
    yield reply.chunk({"role": "assistant", "content": ""})
    try:
        async for event in run.events():
            if isinstance(event, Keepalive):
                yield KEEPALIVE
            elif isinstance(event, TextDelta):
                yield reply.chunk({"content": event.text})
            elif isinstance(event, ReasoningDelta):
                yield reply.chunk({"reasoning_content": event.text})
            elif isinstance(event, ToolCallDelta):
                for delta in _call_deltas(event.index, event.call):
                    yield reply.chunk(delta)
            elif isinstance(event, Finished):
                completion = event.completion
                yield reply.chunk({}, finish_reason=completion.finish_reason)
                if reply.body.include_usage_in_stream():
                    yield reply.chunk(None, stats=completion.stats)
                yield DONE
    except APIError as error:  # headers are sent: the failure is reported in-stream, as OpenAI does
        yield sse_data(openai_error_body(error.message, error.error_type, error.param, error.code))


def build_router(service: Callable[[], ChatService]) -> APIRouter:
    """``service`` returns the chat core (APIError 503 while the model loads)."""
    router = APIRouter()

    @router.post(CHAT_COMPLETIONS_PATH, response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        run = service().start(body.to_chat_request(), trace=lambda: body.model_dump(exclude_unset=True))
        reply = _Reply(body)
        if body.stream:
            return event_stream(_stream(run, reply))
        return JSONResponse(reply.completion(await run.complete(request)))

    return router
