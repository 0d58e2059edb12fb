"""Tool calling and structured output, through the openai SDK, against the real default model.

The default SmolLM2-135M cannot call tools on its own; these tests show that
with a grammar it always produces calls and JSON that parse and validate, and
that a full call -> result -> answer loop works.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from .conftest import RunningServer

pytestmark = pytest.mark.e2e

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
SEARCH_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["query"],
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {"name": "search_web", "description": "Search the web", "parameters": SEARCH_PARAMETERS},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "search_web": SEARCH_PARAMETERS}
WEATHER_QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What's the weather in Paris?"}]
TWO_CITIES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Weather in Paris and in London? Call the tool for each city."}
]
FORCE_WEATHER: Any = {"type": "function", "function": {"name": "get_weather"}}


def bounded_strings(tool: ChatCompletionToolParam, length: int = 40) -> ChatCompletionToolParam:
    """``tool`` with every free string at most ``length`` characters: sampled at temperature 1, the 135M model
    may otherwise write a query past any token limit, and a call cut off there is no call."""
    parameters = SCHEMAS[tool["function"]["name"]]
    properties = {name: {**field, "maxLength": length} if field["type"] == "string" and "enum" not in field else field
                  for name, field in parameters["properties"].items()}  # fmt: skip
    return {**tool, "function": {**tool["function"], "parameters": {**parameters, "properties": properties}}}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0, timeout=120) as openai_client:
        yield openai_client


def force_weather_call(client: OpenAI) -> ChatCompletion:
    """The question about Paris, with get_weather forced, greedy."""
    return client.chat.completions.create(
        model="m", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice=FORCE_WEATHER, temperature=0, max_tokens=60
    )


def function_calls(response: ChatCompletion) -> list[ChatCompletionMessageFunctionToolCall]:
    calls = response.choices[0].message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls)
    return [call for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)]


def assert_valid_calls(response: ChatCompletion) -> list[tuple[str, dict[str, Any]]]:
    """Every call has a unique id, type function, an offered name and arguments valid for its schema."""
    choice = response.choices[0]
    calls = function_calls(response)
    assert calls, f"no tool calls; content was {choice.message.content!r}"
    assert choice.finish_reason == "tool_calls"
    assert len({call.id for call in calls}) == len(calls)
    parsed = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        parsed.append((call.function.name, arguments))
    return parsed


class TestForcedCalls:
    def test_named_function(self, client: OpenAI) -> None:
        """A named tool_choice gives exactly one call of that function, with valid arguments."""
        response = force_weather_call(client)
        calls = assert_valid_calls(response)
        assert [name for name, _ in calls] == ["get_weather"]
        assert response.choices[0].message.content is None

    def test_sampled_calls_always_validate(self, client: OpenAI) -> None:
        """tool_choice required at temperature 1: whatever the model samples is one valid call to an offered tool."""
        for seed in range(3):
            response = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "Find me recent news about rockets."}],
                tools=[bounded_strings(tool) for tool in TOOLS],
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=1.0,
                seed=seed,
                max_tokens=200,
            )
            assert len(assert_valid_calls(response)) == 1

    def test_ids_are_unique_across_requests(self, client: OpenAI) -> None:
        """Two identical requests get different call ids (the original reused call_0 every turn).

        The second is answered from the response cache: its calls get fresh ids too.
        """
        ids: set[str] = set()
        for _ in range(2):
            response = force_weather_call(client)
            ids.update(call.id for call in response.choices[0].message.tool_calls or [])
        assert len(ids) == 2

    def test_parallel_calls_when_allowed(self, client: OpenAI) -> None:
        """With parallel_tool_calls (the default) the model may make several calls; all are returned."""
        response = client.chat.completions.create(
            model="m", messages=TWO_CITIES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=256
        )
        calls = assert_valid_calls(response)
        assert len(calls) >= 2
        assert len({json.dumps(call, sort_keys=True) for call in calls}) == len(calls), "no call is repeated"

    def test_one_call_when_parallel_is_off(self, client: OpenAI) -> None:
        """parallel_tool_calls false: exactly one call, even when the user asks for two."""
        response = client.chat.completions.create(
            model="m",
            messages=TWO_CITIES,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=256,
        )
        assert len(assert_valid_calls(response)) == 1


class TestConversation:
    def test_call_result_answer_loop(self, client: OpenAI) -> None:
        """Call, tool result, final answer: the answer is text that uses the tool's result."""
        first = force_weather_call(client)
        call = function_calls(first)[0]
        history: list[ChatCompletionMessageParam] = [
            *WEATHER_QUESTION,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})},
        ]
        answer = client.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0, max_tokens=40)
        choice = answer.choices[0]
        assert choice.message.tool_calls is None
        assert choice.finish_reason in ("stop", "length") and choice.message.content
        assert answer.usage is not None and first.usage is not None
        assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 20, "the call and its result were rendered"

    def test_tool_choice_none_answers_in_text(self, client: OpenAI) -> None:
        response = client.chat.completions.create(
            model="m", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20
        )
        assert response.choices[0].message.tool_calls is None
        assert response.choices[0].message.content

    def test_auto_leaves_generation_free(self, client: OpenAI) -> None:
        """With auto, a model that answers in prose gets its prose back as content, not an error."""
        response = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Say hello."}],
            tools=TOOLS,
            temperature=0,
            max_tokens=12,
        )
        assert response.choices[0].finish_reason in ("stop", "length")
        assert response.choices[0].message.content

    def test_tools_change_the_cached_answer_key(self, client: OpenAI) -> None:
        """The same messages with and without tools are different requests to the response cache."""
        plain = client.chat.completions.create(model="m", messages=WEATHER_QUESTION, temperature=0, max_tokens=20)
        with_tools = force_weather_call(client)
        assert plain.choices[0].message.tool_calls is None
        assert_valid_calls(with_tools)


class TestStreaming:
    def test_tool_call_deltas_reassemble(self, client: OpenAI) -> None:
        """OpenAI's shape: the first delta of a call has index, id, type and name with empty arguments."""
        stream = client.chat.completions.create(
            model="m",
            messages=WEATHER_QUESTION,
            tools=TOOLS,
            tool_choice=FORCE_WEATHER,
            temperature=0,
            max_tokens=60,
            stream=True,
        )
        calls: dict[int, dict[str, str]] = {}
        finish_reasons = []
        for chunk in stream:
            if not chunk.choices:
                continue
            finish_reasons.append(chunk.choices[0].finish_reason)
            for delta in chunk.choices[0].delta.tool_calls or []:
                assert delta.function is not None
                if delta.index not in calls:
                    assert delta.id and delta.type == "function" and delta.function.name
                    assert delta.function.arguments == ""
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
        assert finish_reasons[-1] == "tool_calls"
        assert list(calls) == [0]
        assert calls[0]["name"] == "get_weather"
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMETERS)
        whole = force_weather_call(client)
        assert json.loads(calls[0]["arguments"]) == json.loads(function_calls(whole)[0].function.arguments)

    def test_parallel_calls_stream_with_increasing_indexes(self, client: OpenAI) -> None:
        stream = client.chat.completions.create(
            model="m",
            messages=TWO_CITIES,
            tools=TOOLS,
            tool_choice="required",
            temperature=0,
            max_tokens=256,
            stream=True,
        )
        indexes = [
            delta.index
            for chunk in stream
            if chunk.choices
            for delta in chunk.choices[0].delta.tool_calls or []
            if delta.id is not None
        ]
        assert indexes == list(range(len(indexes))) and len(indexes) >= 2


PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
}
PERSON_QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Describe a fictional programmer as JSON."}
]


class TestResponseFormat:
    def test_json_schema_output_validates(self, client: OpenAI) -> None:
        response = client.chat.completions.create(
            model="m",
            messages=PERSON_QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
            temperature=0.7,
            seed=3,
            max_tokens=100,
        )
        assert response.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(response.choices[0].message.content or ""), PERSON_SCHEMA)

    def test_json_object_output_parses(self, client: OpenAI) -> None:
        response = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=60,
        )
        assert isinstance(json.loads(response.choices[0].message.content or ""), dict)

    def test_streamed_json_schema_output_validates(self, client: OpenAI) -> None:
        stream = client.chat.completions.create(
            model="m",
            messages=PERSON_QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
            temperature=0,
            max_tokens=100,
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)

    def test_json_output_or_a_call_with_auto(self, client: OpenAI) -> None:
        """auto plus a JSON format: the output is either valid calls or the JSON, nothing else."""
        response = client.chat.completions.create(
            model="m",
            messages=PERSON_QUESTION,
            tools=TOOLS,
            parallel_tool_calls=False,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
            temperature=0,
            max_tokens=200,
        )
        if response.choices[0].message.tool_calls:
            assert_valid_calls(response)
        else:
            jsonschema.validate(json.loads(response.choices[0].message.content or ""), PERSON_SCHEMA)
