"""Request bodies and tools the server specifications share, so each test file states only what it checks."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx

from mlx_server.vocabulary import (
    Engine,
    GeneratedText,
    GenerationFinished,
    GenerationRequest,
    GenerationStats,
)

from .conftest import RunningServer

#: The default model's name, its file's stem: what a reply's ``model`` field says when no other model is named.
DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1"

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"

HI = [{"role": "user", "content": "Hi"}]
FRANCE = "What is the capital of France?"
WEATHER_QUESTION = "What's the weather in Paris?"
LONG_ANSWER = "Write a long story about a dragon and a knight."

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
WEATHER_DESCRIPTION = "Get the current weather for a city"
WEATHER_RESULT = json.dumps({"temperature_c": 18, "sky": "sunny"})


def chat_body(content: str = "Hi", max_tokens: int = 2, **fields: Any) -> dict[str, Any]:
    """A greedy OpenAI chat request."""
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **fields,
    }


def messages_body(content: str = "Hi", max_tokens: int = 2, **fields: Any) -> dict[str, Any]:
    """A greedy Anthropic messages request (temperature in the body, as older clients send it)."""
    return {
        "model": "claude-test",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **fields,
    }


def anthropic_weather_tool() -> dict[str, Any]:
    return {"name": "get_weather", "description": WEATHER_DESCRIPTION, "input_schema": WEATHER_PARAMETERS}


def openai_weather_tool() -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": "get_weather", "description": WEATHER_DESCRIPTION, "parameters": WEATHER_PARAMETERS},
    }


def responses_weather_tool() -> dict[str, Any]:
    return {
        "type": "function",
        "name": "get_weather",
        "description": WEATHER_DESCRIPTION,
        "parameters": WEATHER_PARAMETERS,
    }


def post_chat(
    server: RunningServer,
    messages: str | list[dict[str, Any]] = "Hi",
    max_tokens: int = 2,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> httpx.Response:
    """POST a greedy chat completion (a string is one user message)."""
    body = chat_body(max_tokens=max_tokens, **fields)
    body["messages"] = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    return httpx.post(server.base_url + CHAT, json=body, headers=headers, timeout=300)


def chat_result(server: RunningServer, messages: str | list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A chat completion that must succeed, as JSON."""
    response = post_chat(server, messages, **fields)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def cached_tokens(result: dict[str, Any]) -> int:
    """The prompt tokens a chat completion took from the prompt cache."""
    return int(result["usage"]["prompt_tokens_details"]["cached_tokens"])


async def collect(
    engine: Engine, request: GenerationRequest, end_after: int | None = None
) -> tuple[str, GenerationStats | None]:
    """An engine's text and final stats for one request; after ``end_after`` pieces it is ended early.

    Ending early is the engine's ``abort`` (the sequence stops and still
    reports); a caller that wants a disconnect instead closes the stream.
    """
    parts: list[str] = []
    stats: GenerationStats | None = None
    if not request.request_id:
        request = dataclasses.replace(request, request_id=f"collect-{id(request)}")
    async for event in engine.stream(request):
        if isinstance(event, GeneratedText):
            parts.append(event.text)
            if end_after is not None and len(parts) == end_after:
                engine.abort(request.request_id)
        elif isinstance(event, GenerationFinished):
            stats = event.stats
    return "".join(parts), stats
