"""OpenAI's Responses API through the official ``openai`` SDK, against the real default model.

The default path of Codex CLI, openai-agents, pydantic-ai and the AI SDK:
plain and streamed responses (the documented events, in order), forced and
streamed function calls, a function_call_output round, JSON schema output,
previous_response_id and the tools agents send that this server cannot run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage

from .conftest import RunningServer
from .helpers import (
    DEFAULT_MODEL,
    FRANCE,
    LONG_ANSWER,
    WEATHER_PARAMETERS,
    WEATHER_QUESTION,
    WEATHER_RESULT,
    responses_weather_tool,
)

pytestmark = pytest.mark.e2e

WEATHER: Any = responses_weather_tool()
FORCE_WEATHER: Any = {"type": "function", "name": "get_weather"}
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0, timeout=120) as sdk:
        yield sdk


def function_calls(response: Any) -> list[ResponseFunctionToolCall]:
    return [item for item in response.output if isinstance(item, ResponseFunctionToolCall)]


class TestResponses:
    def test_response_object(self, client: OpenAI) -> None:
        """A completed response with one message, output_text and usage with cached tokens."""
        response = client.responses.create(model="gpt-5-codex", input=FRANCE, max_output_tokens=32, temperature=0)
        assert response.id.startswith("resp_") and response.object == "response"
        assert response.model == DEFAULT_MODEL and response.status == "completed"
        assert isinstance(response.output[0], ResponseOutputMessage)
        assert response.output_text
        assert response.usage is not None and response.usage.output_tokens >= 1
        assert 0 <= response.usage.input_tokens_details.cached_tokens < response.usage.input_tokens

    def test_instructions_are_the_system_prompt(self, client: OpenAI) -> None:
        """They replace the template's default system prompt (SmolLM2's names itself)."""
        instructions = "You are a geography teacher who answers every question in exactly one word. " * 3
        plain = client.responses.create(model="m", input=FRANCE, max_output_tokens=1, temperature=0)
        instructed = client.responses.create(
            model="m", input=FRANCE, instructions=instructions, max_output_tokens=1, temperature=0
        )
        assert plain.usage is not None and instructed.usage is not None
        assert instructed.usage.input_tokens > plain.usage.input_tokens + 20
        assert instructed.instructions == instructions

    def test_incomplete_at_max_output_tokens(self, client: OpenAI) -> None:
        response = client.responses.create(model="m", input=LONG_ANSWER, max_output_tokens=3, temperature=0)
        assert response.status == "incomplete"
        assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
        assert response.usage is not None and response.usage.output_tokens == 3

    def test_input_items(self, client: OpenAI) -> None:
        """A list of message items with input_text and output_text parts, developer role included."""
        items: Any = [
            {"role": "developer", "content": "Answer briefly."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": FRANCE}]},
        ]
        response = client.responses.create(model="m", input=items, max_output_tokens=12, temperature=0)
        assert response.status in ("completed", "incomplete") and response.output_text

    def test_streamed_events_in_order(self, client: OpenAI) -> None:
        """created, in_progress, the message item and its part, text deltas, the dones, completed."""
        stream = client.responses.create(model="m", input=FRANCE, max_output_tokens=12, temperature=0, stream=True)
        events = list(stream)
        kinds = [event.type for event in events]
        assert [event.sequence_number for event in events] == list(range(len(events)))
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert set(kinds[4:-4]) == {"response.output_text.delta"}
        text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
        final = events[-1].response  # type: ignore[union-attr]
        assert text and final.output_text == text and final.status == "completed"

    def test_previous_response_id_continues_the_conversation(self, client: OpenAI) -> None:
        """The stored response's input and output come first; the prefix cache reads them."""
        first = client.responses.create(model="m", input=FRANCE, max_output_tokens=12, temperature=0)
        second = client.responses.create(
            model="m", input="And of Italy?", previous_response_id=first.id, max_output_tokens=12, temperature=0
        )
        assert second.previous_response_id == first.id
        assert second.usage is not None and first.usage is not None
        assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
        assert client.responses.retrieve(second.id).id == second.id

    def test_unknown_previous_response_is_a_404(self, client: OpenAI) -> None:
        with pytest.raises(openai.NotFoundError) as raised:
            client.responses.create(model="m", input="Hi", previous_response_id="resp_nope", max_output_tokens=2)
        error = raised.value.body
        assert error["code"] == "previous_response_not_found" and error["param"] == "previous_response_id"  # type: ignore[index]

    def test_unstored_responses_cannot_be_continued(self, client: OpenAI) -> None:
        first = client.responses.create(model="m", input="Hi", max_output_tokens=2, temperature=0, store=False)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="m", input="Hi", previous_response_id=first.id, max_output_tokens=2)


class TestFunctionCalls:
    def test_forced_call_validates(self, client: OpenAI) -> None:
        response = client.responses.create(
            model="m", input=WEATHER_QUESTION, tools=[WEATHER], tool_choice=FORCE_WEATHER, temperature=0,
            max_output_tokens=60,
        )  # fmt: skip
        calls = function_calls(response)
        assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER_PARAMETERS)
        assert response.status == "completed"

    def test_streamed_call_events_and_arguments(self, client: OpenAI) -> None:
        stream = client.responses.create(
            model="m", input=WEATHER_QUESTION, tools=[WEATHER], tool_choice=FORCE_WEATHER, temperature=0,
            max_output_tokens=60, stream=True,
        )  # fmt: skip
        events = list(stream)
        kinds = [event.type for event in events]
        added = kinds.index("response.output_item.added")
        assert kinds[added : added + 4] == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ]
        done = events[added + 2]
        assert done.type == "response.function_call_arguments.done"
        jsonschema.validate(json.loads(done.arguments), WEATHER_PARAMETERS)
        final = events[-1]
        assert final.type == "response.completed"
        assert function_calls(final.response)[0].arguments == done.arguments

    def test_function_call_output_round(self, client: OpenAI) -> None:
        """call -> function_call_output -> a text answer that uses the result."""
        first = client.responses.create(
            model="m", input=WEATHER_QUESTION, tools=[WEATHER], tool_choice=FORCE_WEATHER, temperature=0,
            max_output_tokens=60,
        )  # fmt: skip
        call = function_calls(first)[0]
        answer = client.responses.create(
            model="m",
            input=[
                {"role": "user", "content": WEATHER_QUESTION},
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT},
            ],
            tools=[WEATHER],
            temperature=0,
            max_output_tokens=40,
        )
        assert not function_calls(answer) and answer.output_text
        assert answer.usage is not None and first.usage is not None
        assert answer.usage.input_tokens > first.usage.input_tokens + 20, "the call and its result were rendered"

    def test_tools_the_server_cannot_run_are_left_out(self, client: OpenAI, server: RunningServer) -> None:
        """web_search and tool_search (Codex sends them every request) are not a 400; namespaced functions work."""
        namespace: Any = {
            "type": "namespace",
            "name": "weather_v1",
            "description": "Weather tools",
            "tools": [{**WEATHER, "name": "current"}],
        }
        response = client.responses.create(
            model="m",
            input=WEATHER_QUESTION,
            tools=[{"type": "web_search"}, {"type": "tool_search"}, namespace],
            tool_choice="required",
            temperature=0,
            max_output_tokens=60,
        )
        call = response.output[0].model_dump()
        assert call["type"] == "function_call" and call["name"] == "current" and call["namespace"] == "weather_v1"

    def test_custom_tool_with_a_grammar(self, client: OpenAI) -> None:
        """A custom tool's input is decoded under its Lark grammar and returned as text."""
        shout: Any = {
            "type": "custom",
            "name": "shout",
            "description": "Shout a word",
            "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "HEY" "!"+'},
        }
        response = client.responses.create(
            model="m", input="Shout hey.", tools=[shout], tool_choice={"type": "custom", "name": "shout"},
            temperature=0, max_output_tokens=30,
        )  # fmt: skip
        call = response.output[0].model_dump()
        assert call["type"] == "custom_tool_call" and call["name"] == "shout"
        assert call["input"].startswith("HEY!") and set(call["input"][3:]) == {"!"}


class TestStructuredOutput:
    def test_json_schema_output_validates(self, client: OpenAI) -> None:
        response = client.responses.create(
            model="m",
            input=FRANCE + " Answer with the city and its country.",
            text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}},
            temperature=0,
            max_output_tokens=40,
        )
        jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)
