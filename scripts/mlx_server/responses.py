"""OpenAI response objects and the server-sent-events wire format."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mlx_server.generation import GenerationStats
from mlx_server.tool_parsing import ParsedToolCall

__all__ = ["DONE", "chunk", "completion", "sse", "tool_call_deltas", "usage"]

DONE = b"data: [DONE]\n\n"


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def completion(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    stats: GenerationStats,
    tool_calls: Sequence[ParsedToolCall] = (),
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object; with tool calls, empty content is ``null`` as OpenAI sends it."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = [call.as_openai() for call in tool_calls]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason or stats.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(stats),
    }


def tool_call_deltas(index: int, call: ParsedToolCall) -> list[dict[str, Any]]:
    """A call as stream deltas, in OpenAI's shape: id, type and name first, then the arguments."""
    opening = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [{"tool_calls": [opening]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    stats: GenerationStats | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` gives the usage chunk (``choices: []``)."""
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None:
        body["choices"] = []
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    if stats is not None:
        body["usage"] = usage(stats)
    return body


def sse(body: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
