"""Bad input gets a clear OpenAI-shaped error with the right status, and the server keeps serving.

Against the real application over the scripted engine (validation and the
chat core's rules need no model); the context is 8,192 tokens, as the
default model's.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.testclient import TestClient

from mlx_server.settings import Settings

from .helpers import CHAT, HI, chat_body
from .scripted import scripted_server

HUGE_PROMPT = "word " * 9_000  # past the 8,192-token context
# litellm raises ContextWindowExceededError when the message contains this (its exception_mapping_utils).
LITELLM_CONTEXT_PATTERN = "this model's maximum context length is"
OPENAI_WORDING = re.compile(
    r"^This model's maximum context length is (\d+) tokens\. However, you requested (\d+) tokens "
    r"\((\d+) in the messages, (\d+) in the completion\)\."
)


WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _tool(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": function}


# (case, method, path, raw body or JSON, status, error code, param)
BAD_REQUESTS: list[tuple[str, str, str, bytes | dict[str, Any], int, str | None, str | None]] = [
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [', 400, "invalid_json", None),
    ("empty body", "POST", "/v1/chat/completions", b"", 400, None, None),
    ("body is a list", "POST", "/v1/chat/completions", b"[]", 400, None, None),
    ("missing messages", "POST", "/v1/chat/completions", {"model": "m"}, 400, "invalid_value", "messages"),
    ("empty messages", "POST", "/v1/chat/completions", chat_body(messages=[]), 400, "invalid_value", "messages"),
    (
        "messages is a string",
        "POST",
        "/v1/chat/completions",
        chat_body(messages="hello"),
        400,
        "invalid_value",
        "messages",
    ),
    (
        "message without role",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"content": "x"}]),
        400,
        None,
        "messages[0].role",
    ),
    (
        "unknown role",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "invalid_value",
        "messages[0].role",
    ),
    (
        "content is a number",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": 5}]),
        400,
        None,
        None,
    ),
    (
        "user content is null",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": None}]),
        400,
        None,
        None,
    ),
    (
        "audio content part",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]),
        400,
        None,
        None,
    ),
    (
        "image data URL that is not base64",
        "POST",
        "/v1/chat/completions",
        chat_body(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}
            ]
        ),
        400,
        None,
        None,
    ),
    (
        "file given by id",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]),
        400,
        None,
        None,
    ),
    (
        "negative max_tokens",
        "POST",
        "/v1/chat/completions",
        chat_body(max_tokens=-5),
        400,
        "invalid_value",
        "max_tokens",
    ),
    ("zero max_tokens", "POST", "/v1/chat/completions", chat_body(max_tokens=0), 400, "invalid_value", "max_tokens"),
    (
        "max_tokens as text",
        "POST",
        "/v1/chat/completions",
        {**chat_body(), "max_tokens": "10"},
        400,
        "invalid_value",
        "max_tokens",
    ),
    (
        "temperature as text",
        "POST",
        "/v1/chat/completions",
        chat_body(temperature="hot"),
        400,
        "invalid_value",
        "temperature",
    ),
    (
        "temperature too high",
        "POST",
        "/v1/chat/completions",
        chat_body(temperature=5),
        400,
        "invalid_value",
        "temperature",
    ),
    (
        "temperature NaN",
        "POST",
        "/v1/chat/completions",
        b'{"messages":[{"role":"user","content":"x"}],"temperature":NaN}',
        400,
        None,
        "temperature",
    ),
    ("top_p zero", "POST", "/v1/chat/completions", chat_body(top_p=0), 400, "invalid_value", "top_p"),
    ("seed as float", "POST", "/v1/chat/completions", chat_body(seed=1.5), 400, "invalid_value", "seed"),
    ("n above one", "POST", "/v1/chat/completions", chat_body(n=2), 400, "unsupported_parameter", "n"),
    ("logprobs", "POST", "/v1/chat/completions", chat_body(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    (
        "five stop sequences",
        "POST",
        "/v1/chat/completions",
        chat_body(stop=["a", "b", "c", "d", "e"]),
        400,
        "invalid_value",
        "stop",
    ),
    ("empty stop sequence", "POST", "/v1/chat/completions", chat_body(stop=""), 400, "invalid_value", "stop"),
    ("stream as text", "POST", "/v1/chat/completions", chat_body(stream="yes"), 400, "invalid_value", "stream"),
    (
        "stream_options without stream",
        "POST",
        "/v1/chat/completions",
        chat_body(stream_options={"include_usage": True}),
        400,
        "unsupported_parameter",
        "stream_options",
    ),
    (
        "huge prompt",
        "POST",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": HUGE_PROMPT}]),
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("tool without type", "POST", CHAT, chat_body(tools=[{"function": WEATHER}]), 400, None, "tools[0].type"),
    (
        "tool name with spaces",
        "POST",
        CHAT,
        chat_body(tools=[_tool({**WEATHER, "name": "get weather"})]),
        400,
        "invalid_value",
        "tools[0].function.name",
    ),
    (
        "tool schema of an unknown type",
        "POST",
        CHAT,
        chat_body(tools=[_tool({**WEATHER, "parameters": {"type": "banana"}})]),
        400,
        "invalid_schema",
        "tools[0].function.parameters",
    ),
    (
        "tool schema with a broken pattern",
        "POST",
        CHAT,
        chat_body(tools=[_tool({**WEATHER, "parameters": {"type": "object", "properties": {"a": {"pattern": "("}}}})]),
        400,
        "invalid_schema",
        "tools[0].function.parameters",
    ),
    ("repeated tool names", "POST", CHAT, chat_body(tools=[_tool(WEATHER), _tool(WEATHER)]), 400, None, "tools"),
    (
        "unknown tool_choice",
        "POST",
        CHAT,
        chat_body(tools=[_tool(WEATHER)], tool_choice="always"),
        400,
        None,
        "tool_choice",
    ),
    ("tool_choice without tools", "POST", CHAT, chat_body(tool_choice="required"), 400, None, "tool_choice"),
    (
        "tool_choice names a missing tool",
        "POST",
        CHAT,
        chat_body(tools=[_tool(WEATHER)], tool_choice={"type": "function", "function": {"name": "launch"}}),
        400,
        "unsupported_parameter",
        "tool_choice",
    ),
    (
        "tool call arguments as a number",
        "POST",
        CHAT,
        chat_body(
            messages=[
                *HI,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": 5}}],
                },
            ]
        ),
        400,
        None,
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "unknown response_format",
        "POST",
        CHAT,
        chat_body(response_format={"type": "xml"}),
        400,
        None,
        "response_format.type",
    ),
    (
        "json_schema format without a schema object",
        "POST",
        CHAT,
        chat_body(response_format={"type": "json_schema"}),
        400,
        None,
        "response_format",
    ),
    (
        "response schema that cannot be satisfied",
        "POST",
        CHAT,
        chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}}),
        400,
        "invalid_schema",
        "response_format.json_schema.schema",
    ),
    ("unknown route", "POST", "/v1/completions/nope", chat_body(), 404, "unknown_url", None),
    ("wrong method", "GET", "/v1/chat/completions", b"", 405, "method_not_allowed", None),
]


@pytest.fixture(scope="module")
def http() -> TestClient:
    return scripted_server().client


class TestBadRequests:
    @pytest.mark.parametrize(
        ("case", "method", "path", "payload", "status", "code", "param"),
        BAD_REQUESTS,
        ids=[row[0] for row in BAD_REQUESTS],
    )
    def test_rejected_clearly_and_server_keeps_serving(
        self,
        http: TestClient,
        case: str,
        method: str,
        path: str,
        payload: bytes | dict[str, Any],
        status: int,
        code: str | None,
        param: str | None,
    ) -> None:
        """Each bad request gets its status and an OpenAI error; a good request right after still works."""
        if isinstance(payload, bytes):
            response = http.request(method, path, content=payload, headers={"content-type": "application/json"})
        else:
            response = http.request(method, path, json=payload)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["message"] and "Traceback" not in response.text
        assert error["type"] == "invalid_request_error"
        if code is not None:
            assert error["code"] == code
        if param is not None:
            assert error["param"] == param
        after = http.post("/v1/chat/completions", json=chat_body(max_tokens=1))
        assert after.status_code == 200
        assert after.json()["usage"]["completion_tokens"] == 1


class TestCompletionLimits:
    def test_a_limit_past_the_context_is_a_ceiling(self) -> None:
        """max_tokens beyond what the context holds generates until the context is full: 200, never a 400."""
        server = scripted_server()
        response = server.client.post(CHAT, json=chat_body(max_tokens=100_000))
        assert response.status_code == 200, response.text
        prompt_tokens = response.json()["usage"]["prompt_tokens"]
        assert server.engine.requests[-1].max_tokens == 8192 - prompt_tokens

    def test_strict_max_tokens_keeps_openais_400(self) -> None:
        """--strict-max-tokens answers the same request with OpenAI's overflow error and wording."""
        strict = scripted_server(Settings(strict_max_tokens=True)).client
        response = strict.post(CHAT, json=chat_body(max_tokens=10_000))
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        assert LITELLM_CONTEXT_PATTERN in error["message"].lower()
        match = OPENAI_WORDING.match(error["message"])
        assert match is not None
        context, total, prompt, completion = (int(group) for group in match.groups())
        assert (context, completion) == (8192, 10_000) and total == prompt + completion
