"""Hostile input: fuzzed and pathological requests never get a 500 or a traceback, and the server keeps serving.

The fuzzing is property-based (hypothesis) against the real application
over the scripted engine, in-process, on every generation route (OpenAI chat
completions, responses and legacy completions, Anthropic messages):
arbitrary JSON, valid requests with one field replaced by anything, and raw
bytes.  Validation, translation and the chat core are all real; only the
tokens are scripted, so thousands of requests take seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_server.settings import Settings

from .helpers import CHAT, COMPLETIONS, MESSAGES, RESPONSES
from .scripted import InProcessClient, scripted_server

VALID = {
    "model": "m",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "max_tokens": 2,
    "temperature": 0,
}
FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
]
MESSAGE_FIELDS = ["role", "content", "name", "tool_call_id", "tool_calls"]


@dataclass(frozen=True)
class Route:
    """One generation route: a valid body, the fields to mutate, and how its success and errors look."""

    path: str
    valid: dict[str, Any]
    fields: list[str]
    message_fields: list[str]
    message_list: str | None
    succeeded: Callable[[dict[str, Any]], bool]
    error_message: Callable[[dict[str, Any]], Any]


def _openai_error(body: dict[str, Any]) -> Any:
    return body["error"]["message"]


def _anthropic_error(body: dict[str, Any]) -> Any:
    assert body["type"] == "error" and isinstance(body["error"]["type"], str)
    return body["error"]["message"]


ROUTES = {
    "chat": Route(
        CHAT, VALID, FIELDS, MESSAGE_FIELDS, "messages", lambda b: b["object"] == "chat.completion", _openai_error
    ),
    "messages": Route(
        MESSAGES,
        {
            "model": "claude-x",
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 2,
            "temperature": 0,
        },
        [
            "model",
            "system",
            "messages",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "stop_sequences",
            "stream",
            "tools",
            "tool_choice",
            "thinking",
            "metadata",
        ],
        ["role", "content"],
        "messages",
        lambda b: b["type"] == "message",
        _anthropic_error,
    ),
    "responses": Route(
        RESPONSES,
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "max_output_tokens": 2,
            "temperature": 0,
            "store": False,
        },
        [
            "model",
            "input",
            "instructions",
            "max_output_tokens",
            "temperature",
            "top_p",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "text",
            "previous_response_id",
            "store",
            "metadata",
            "stream",
            "reasoning",
        ],
        ["type", "role", "content", "call_id", "output", "name", "arguments"],
        "input",
        lambda b: b["object"] == "response",
        _openai_error,
    ),
    "completions": Route(
        COMPLETIONS,
        {"model": "m", "prompt": "Hello", "max_tokens": 2, "temperature": 0},
        [
            "model",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "stream",
            "echo",
            "suffix",
            "n",
            "logprobs",
            "best_of",
        ],
        [],
        None,
        lambda b: b["object"] == "text_completion",
        _openai_error,
    ),
}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# Any text, lone surrogates and control characters included.
any_text = st.text(st.characters(codec=None, categories=None), max_size=40)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
# Lengths the server accepts would generate that many tokens; keep valid ones tiny.
token_counts = st.one_of(st.integers(max_value=2), st.integers(min_value=10**6), json_values)


@st.composite
def mutated_requests(draw: st.DrawFn, route: Route) -> dict[str, Any]:
    """A valid request with a top-level field, or a field of its last message, replaced by anything."""
    body: dict[str, Any] = json.loads(json.dumps(route.valid))
    if route.message_list is None or draw(st.booleans()):
        field = draw(st.sampled_from(route.fields))
        body[field] = draw(token_counts if field in TOKEN_FIELDS else json_values)
    else:
        body[route.message_list][-1][draw(st.sampled_from(route.message_fields))] = draw(json_values)
    if body.get("stream") is True:
        body["stream"] = False  # streamed errors are tested elsewhere; here every answer is one JSON body
    return body


@pytest.fixture(scope="module")
def http() -> InProcessClient:
    return scripted_server(Settings(default_max_tokens=2, request_timeout=20, response_cache_size=0)).fast


def assert_handled(response: httpx.Response, route: Route = ROUTES["chat"]) -> None:
    """Not a 500; an error is the route's dialect's shape with a message and no traceback."""
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    body = response.json()
    if response.status_code >= 400:
        message = route.error_message(body)
        assert isinstance(message, str) and message
    else:
        assert route.succeeded(body), body


def post(http: InProcessClient, route: Route, raw: bytes) -> None:
    assert_handled(http.post(route.path, content=raw, headers={"content-type": "application/json"}), route)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )


# NaN and Infinity are encoded as JavaScript writes them; surrogates escaped.
@fuzz_settings(1000)
@given(body=mutated_requests(ROUTES["chat"]))
def test_fuzzed_chat_requests(http: InProcessClient, body: dict[str, Any]) -> None:
    post(http, ROUTES["chat"], json.dumps(body).encode())


@fuzz_settings(600)
@given(body=mutated_requests(ROUTES["messages"]))
def test_fuzzed_anthropic_messages(http: InProcessClient, body: dict[str, Any]) -> None:
    post(http, ROUTES["messages"], json.dumps(body).encode())


@fuzz_settings(600)
@given(body=mutated_requests(ROUTES["responses"]))
def test_fuzzed_responses(http: InProcessClient, body: dict[str, Any]) -> None:
    post(http, ROUTES["responses"], json.dumps(body).encode())


@fuzz_settings(300)
@given(body=mutated_requests(ROUTES["completions"]))
def test_fuzzed_legacy_completions(http: InProcessClient, body: dict[str, Any]) -> None:
    post(http, ROUTES["completions"], json.dumps(body).encode())


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@fuzz_settings(150)
@given(body=json_values)
def test_arbitrary_json(http: InProcessClient, route: Route, body: Any) -> None:
    post(http, route, json.dumps(body).encode())


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@fuzz_settings(100)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(http: InProcessClient, route: Route, raw: bytes) -> None:
    post(http, route, raw)


# (case, raw body)
PATHOLOGICAL: list[tuple[str, bytes]] = [
    ("deeply nested arrays", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("deeply nested objects", b'{"messages": [{"role": "user", "content": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3\x28"}]}'),
    ("UTF-16 body", json.dumps(VALID).encode("utf-16")),
    ("NaN max_tokens", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}'),
    ("Infinity temperature", b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'),
    ("huge exponent", b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}'),
    ("huge integer", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 4000 + b"}"),
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 2}'),
    (
        "lone surrogate in model name",
        b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}',
    ),
    (
        "lone surrogate in a stop sequence",
        b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud83d"], "max_tokens": 2}',
    ),
    (
        "NUL and escape characters",
        b'{"messages": [{"role": "user", "content": "a\\u0000b\\u001b[31mc\\u0007"}], "max_tokens": 2}',
    ),
    (
        "control characters in names",
        b'{"messages": [{"role": "user", "name": "\\u0000\\n", "content": "x"}], "max_tokens": 2}',
    ),
    ("a million-character string", json.dumps({**VALID, "user": "x" * 1_000_000}).encode()),
    (
        "nested just below the parser's limit",
        json.dumps(VALID).encode()[:-1] + b', "user": ' + b"[" * 900 + b"]" * 900 + b"}",
    ),
    (
        "nested objects just below the limit",
        json.dumps(VALID).encode()[:-1] + b', "tools": ' + b'{"a":' * 900 + b"1" + b"}" * 901,
    ),
]


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("raw", [case[1] for case in PATHOLOGICAL], ids=[case[0] for case in PATHOLOGICAL])
def test_pathological_bodies(http: InProcessClient, route: Route, raw: bytes) -> None:
    post(http, route, raw)


def test_still_serving_after_hostile_input(http: InProcessClient) -> None:
    """After every pathological body on every route, health is ok and a normal request works on each route."""
    for route in ROUTES.values():
        for _, raw in PATHOLOGICAL:
            post(http, route, raw)
    assert http.get("/health").json()["status"] == "ok"
    for route in ROUTES.values():
        assert http.post(route.path, json=route.valid).status_code == 200
