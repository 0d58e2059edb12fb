"""Request bodies and tools the server specifications share, so each test file states only what it checks."""

from __future__ import annotations

import json
from typing import Any

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
