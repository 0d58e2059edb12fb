"""The Anthropic Messages API through the official ``anthropic`` SDK, against the real default model.

Claude Code speaks this dialect; these specify what it and the SDK rely on:
message objects, the streaming event sequence, tools (forced calls whose input
validates, a tool round trip), token counting, Anthropic's usage arithmetic
and its error classes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic import Anthropic
from anthropic.types import MessageParam, ToolUseBlock

from .conftest import RunningServer, start_server, stop_server
from .helpers import (
    DEFAULT_MODEL,
    FRANCE,
    LONG_ANSWER,
    MESSAGES,
    WEATHER_PARAMETERS,
    WEATHER_QUESTION,
    WEATHER_RESULT,
    anthropic_weather_tool,
    messages_body,
)

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0}  # the SDK 2.x has no temperature argument; older clients send it in the body
KEY = "anthropic-test-key-4242"
WEATHER: Any = anthropic_weather_tool()


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Anthropic]:
    with Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def input_total(usage: Any) -> int:
    """What Claude Code adds up: the prompt is input + cache read + cache written."""
    return int(usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0))


class TestMessages:
    def test_message_object(self, client: Anthropic) -> None:
        """A message with a msg_ id, the name of the model that served it, a text block, a stop reason and usage."""
        message = client.messages.create(
            model="claude-opus-4-8", max_tokens=16, messages=user(FRANCE), extra_body=GREEDY
        )
        assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
        assert message.model == DEFAULT_MODEL
        assert message.content[0].type == "text" and message.content[0].text
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert message.usage.output_tokens >= 1 and input_total(message.usage) > 10

    def test_system_blocks_and_content_blocks(self, client: Anthropic) -> None:
        """System as text blocks and user content as blocks, with cache_control markers, are accepted."""
        message = client.messages.create(
            model="m",
            max_tokens=8,
            system=[
                {"type": "text", "text": "You are a geography teacher."},
                {"type": "text", "text": "Answer in one sentence.", "cache_control": {"type": "ephemeral"}},
            ],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "A question:"},
                        {"type": "text", "text": FRANCE, "cache_control": {"type": "ephemeral"}},
                    ],
                }
            ],
            extra_body=GREEDY,
        )
        assert message.content and message.usage.output_tokens >= 1

    def test_max_tokens_is_a_ceiling_not_a_reservation(self, client: Anthropic) -> None:
        """Claude Code asks for 32000 tokens of an 8192-token model: generation runs until a stop instead of a 400."""
        message = client.messages.create(
            model="m", max_tokens=32000, messages=user(FRANCE), stop_sequences=["."], extra_body=GREEDY
        )
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == "."
        assert "." not in message.content[0].text  # type: ignore[union-attr]

    def test_max_tokens_stop_reason(self, client: Anthropic) -> None:
        message = client.messages.create(model="m", max_tokens=3, messages=user(LONG_ANSWER), extra_body=GREEDY)
        assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3

    def test_prompt_too_long_reads_like_anthropic(self, client: Anthropic) -> None:
        """Claude Code recognizes "prompt is too long" and compacts the conversation."""
        with pytest.raises(anthropic.BadRequestError) as raised:
            client.messages.create(model="m", max_tokens=16, messages=user("word " * 9000))
        assert raised.value.status_code == 400
        error = raised.value.body["error"]  # type: ignore[index]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("prompt is too long: ") and "tokens > 8191 maximum" in error["message"]

    def test_cache_reads_across_turns(self, client: Anthropic) -> None:
        """The second turn of a conversation reads the first turn's prompt from the cache."""
        system = "You are a terse assistant. " * 20
        first = client.messages.create(model="m", max_tokens=8, system=system, messages=user(FRANCE), extra_body=GREEDY)
        answer = "".join(block.text for block in first.content if block.type == "text")
        history: list[MessageParam] = [
            *user(FRANCE),
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And of Italy?"},
        ]
        second = client.messages.create(model="m", max_tokens=8, system=system, messages=history, extra_body=GREEDY)
        usage = second.usage
        assert (usage.cache_read_input_tokens or 0) >= 0.9 * input_total(usage)


class TestStreaming:
    def test_text_stream_equals_the_final_message(self, client: Anthropic) -> None:
        with client.messages.stream(model="m", max_tokens=16, messages=user(FRANCE), extra_body=GREEDY) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text and final.content[0].text == text  # type: ignore[union-attr]
        assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens >= 1

    def test_event_sequence(self, server: RunningServer) -> None:
        """message_start, ping, one text block (start, deltas, stop), message_delta, message_stop."""
        body = messages_body(FRANCE, max_tokens=8, stream=True)
        with httpx.stream("POST", server.base_url + MESSAGES, json=body, timeout=120) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        assert [payload["type"] for payload in payloads] == names
        assert names[:3] == ["message_start", "ping", "content_block_start"]
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert set(names[3:-3]) == {"content_block_delta"}
        assert payloads[-2]["usage"]["output_tokens"] >= 1
        assert payloads[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens")


class TestTools:
    def test_forced_call_input_validates(self, client: Anthropic) -> None:
        """tool_choice any: a tool_use block with a toolu_ id whose input matches the schema."""
        message = client.messages.create(
            model="m",
            max_tokens=60,
            messages=user(WEATHER_QUESTION),
            tools=[WEATHER],
            tool_choice={"type": "any"},
            extra_body=GREEDY,
        )
        calls = [block for block in message.content if isinstance(block, ToolUseBlock)]
        assert message.stop_reason == "tool_use" and calls
        assert calls[0].id.startswith("toolu_") and calls[0].name == "get_weather"
        jsonschema.validate(calls[0].input, WEATHER_PARAMETERS)

    def test_streamed_call_equals_the_plain_one(self, client: Anthropic) -> None:
        """input_json_delta pieces rebuild the same input."""
        arguments: dict[str, Any] = {
            "model": "m",
            "max_tokens": 60,
            "messages": user(WEATHER_QUESTION),
            "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "extra_body": GREEDY,
        }
        plain = client.messages.create(**arguments)
        with client.messages.stream(**arguments) as stream:
            streamed = stream.get_final_message()
        assert [block.input for block in streamed.content if isinstance(block, ToolUseBlock)] == [
            block.input for block in plain.content if isinstance(block, ToolUseBlock)
        ]

    def test_tool_round_trip(self, client: Anthropic) -> None:
        """call -> tool_result -> an answer that uses the result."""
        call = client.messages.create(
            model="m",
            max_tokens=60,
            messages=user(WEATHER_QUESTION),
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
            extra_body=GREEDY,
        )
        tool_use = next(block for block in call.content if isinstance(block, ToolUseBlock))
        history: list[MessageParam] = [
            *user(WEATHER_QUESTION),
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tool_use.id, "name": "get_weather", "input": tool_use.input}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": WEATHER_RESULT}],
            },
        ]
        answer = client.messages.create(model="m", max_tokens=40, messages=history, tools=[WEATHER], extra_body=GREEDY)
        text = "".join(block.text for block in answer.content if block.type == "text")
        assert text and answer.stop_reason in ("end_turn", "max_tokens")
        assert input_total(answer.usage) > input_total(call.usage) + 20, "the call and its result were rendered"


class TestCountTokens:
    @pytest.mark.parametrize("with_tools", [False, True], ids=["text", "tools and a tool result"])
    def test_count_equals_the_input_of_the_same_request(self, client: Anthropic, with_tools: bool) -> None:
        messages: list[MessageParam] = user(FRANCE)
        extra: dict[str, Any] = {}
        if with_tools:
            extra = {"tools": [WEATHER]}
            messages = [
                *user(WEATHER_QUESTION),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
            ]
        counted = client.messages.count_tokens(model="m", system="Be brief.", messages=messages, **extra)
        message = client.messages.create(
            model="m", max_tokens=1, system="Be brief.", messages=messages, extra_body=GREEDY, **extra
        )
        assert counted.input_tokens == input_total(message.usage) > 0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with a key, a 64 KiB body limit, one sequence decoding and room for one waiting request."""
    directory = tmp_path_factory.mktemp("anthropic-limits")
    arguments = ["--max-request-bytes", "64K", "--max-batch", "1", "--max-queue", "1", "--response-cache-size", "0"]
    running = start_server(directory / "server.log", {"MLX_SERVER_API_KEY": KEY}, arguments)
    yield running
    stop_server(running)


class TestErrors:
    """Each failure is the SDK's own exception class, in Anthropic's error shape."""

    def sdk(self, server: RunningServer, key: str = KEY) -> Anthropic:
        return Anthropic(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)

    def test_400_names_an_image_that_is_not_base64(self, limited: RunningServer) -> None:
        image: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}
        with pytest.raises(anthropic.BadRequestError) as raised:
            self.sdk(limited).messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [image]}])
        assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert "messages[0].content[0]" in str(raised.value) and "image" in str(raised.value)

    def test_401_wrong_key(self, limited: RunningServer) -> None:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            self.sdk(limited, key="wrong-key").messages.create(model="m", max_tokens=4, messages=user("Hi"))
        assert raised.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]

    def test_404_unknown_route(self, limited: RunningServer) -> None:
        with pytest.raises(anthropic.NotFoundError) as raised:
            self.sdk(limited).post("/v1/messages/nowhere", body={}, cast_to=httpx.Response)
        assert raised.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]

    def test_413_too_large(self, limited: RunningServer) -> None:
        with pytest.raises(anthropic.RequestTooLargeError) as raised:
            self.sdk(limited).messages.create(model="m", max_tokens=4, messages=user("x" * 100_000))
        assert raised.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]

    def test_429_when_the_queue_is_full(self, limited: RunningServer) -> None:
        """With one request generating and one waiting, the next is a rate_limit_error; the others finish."""
        finished: list[int] = []

        def long_stream() -> None:
            body = messages_body(LONG_ANSWER, max_tokens=24, stream=True)
            with httpx.stream(
                "POST", limited.base_url + MESSAGES, json=body, headers={"x-api-key": KEY}, timeout=120
            ) as response:
                finished.append(
                    sum(1 for line in response.iter_lines() if line.startswith("event: content_block_delta"))
                )

        threads = [threading.Thread(target=long_stream) for _ in range(2)]
        for thread in threads:
            thread.start()
        for _ in range(400):  # until both are in the server: one generating, one waiting
            queue = httpx.get(limited.base_url + "/health", headers={"x-api-key": KEY}).json()["queue"]
            if queue["running"] + queue["waiting"] == 2:
                break
            threading.Event().wait(0.05)
        with pytest.raises(anthropic.RateLimitError) as raised:
            self.sdk(limited).messages.create(model="m", max_tokens=4, messages=user("Hi"))
        assert raised.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        for thread in threads:
            thread.join()
        assert len(finished) == 2 and all(count > 0 for count in finished)


class TestShapes:
    def test_models_in_anthropic_shape(self, client: Anthropic) -> None:
        """With anthropic-version (the SDK sends it), models are listed in Anthropic's shape; any id answers."""
        page = client.models.list()
        assert len(page.data) == 1 and page.data[0].type == "model" and page.data[0].display_name
        assert client.models.retrieve("claude-opus-4-8").id == "claude-opus-4-8"

    def test_mid_conversation_system_message(self, server: RunningServer) -> None:
        """Claude Code puts a role: system message between turns when its Agent or Skill tools are on."""
        body = messages_body(FRANCE, max_tokens=4)
        body["messages"] = [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "system", "content": "Available agent types: none."},
            {"role": "user", "content": FRANCE},
        ]
        response = httpx.post(server.base_url + MESSAGES, json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["output_tokens"] >= 1

    def test_thinking_blocks_are_accepted_back(self, server: RunningServer) -> None:
        """A thinking block echoed back with its signature, and Claude Code's extra fields, are accepted."""
        body = messages_body(FRANCE, max_tokens=4)
        body["messages"] = [
            {"role": "user", "content": "Hello"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "The user greets me.", "signature": "abc"},
                    {"type": "redacted_thinking", "data": "xyz"},
                    {"type": "text", "text": "Hi!"},
                ],
            },
            {"role": "user", "content": FRANCE},
        ]
        extras = {
            "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"},
            "metadata": {"user_id": "someone"},
        }
        response = httpx.post(server.base_url + MESSAGES, json={**body, **extras}, timeout=120)
        assert response.status_code == 200, response.text
