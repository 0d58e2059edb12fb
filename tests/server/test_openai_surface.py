"""The rest of the OpenAI surface real clients use: legacy completions, replies that never leak tool markup,
the context-overflow wording clients match, explicit nulls, and any model id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from .conftest import RunningServer
from .helpers import CHAT, COMPLETIONS, FRANCE, WEATHER_QUESTION, chat_body, openai_weather_tool

pytestmark = pytest.mark.e2e

WEATHER: Any = openai_weather_tool()
# litellm raises ContextWindowExceededError when the message contains this (its exception_mapping_utils).
LITELLM_CONTEXT_PATTERN = "this model's maximum context length is"


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0, timeout=120) as sdk:
        yield sdk


class TestLegacyCompletions:
    def test_completion(self, client: OpenAI) -> None:
        completion = client.completions.create(
            model="m", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
        assert completion.choices[0].text
        assert completion.usage is not None and completion.usage.completion_tokens == 8

    def test_default_length_is_openais_16(self, client: OpenAI) -> None:
        completion = client.completions.create(model="m", prompt="Once upon a time", temperature=0)
        assert completion.usage is not None and completion.usage.completion_tokens <= 16

    def test_echo_puts_the_prompt_first(self, client: OpenAI) -> None:
        prompt = "The capital of France is"
        completion = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True)
        assert completion.choices[0].text.startswith(prompt) and len(completion.choices[0].text) > len(prompt)

    def test_token_id_prompt(self, client: OpenAI, loaded_model: Any) -> None:
        """A prompt of token ids is the same prompt as its text."""
        text = "The capital of France is"
        by_text = client.completions.create(model="m", prompt=text, max_tokens=4, temperature=0)
        ids = [int(token) for token in loaded_model.tokenizer.encode(text)]
        by_ids = client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0)
        assert by_ids.choices[0].text == by_text.choices[0].text
        assert by_ids.usage is not None and by_text.usage is not None
        assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)

    def test_streamed_equals_plain(self, client: OpenAI) -> None:
        arguments: dict[str, Any] = {
            "model": "m",
            "prompt": "The capital of France is",
            "max_tokens": 8,
            "temperature": 0,
        }
        plain = client.completions.create(**arguments)
        streamed = "".join(
            chunk.choices[0].text for chunk in client.completions.create(**arguments, stream=True) if chunk.choices
        )
        assert streamed == plain.choices[0].text

    def test_suffix_needs_fim_tokens(self, client: OpenAI) -> None:
        """SmolLM2's vocabulary has no fill-in-the-middle tokens: a clear 400 naming suffix."""
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="m", prompt="def add(a, b):\n    ", suffix="\n    return c", max_tokens=4)
        assert raised.value.body["param"] == "suffix"  # type: ignore[index]
        assert "fill-in-the-middle" in raised.value.body["message"]  # type: ignore[index]


def _assert_no_markup(text: str | None) -> None:
    assert "<tool_call" not in (text or "") and "</tool_call" not in (text or "")


class TestNoToolMarkupInReplies:
    @pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
    def test_forced_calls_cut_by_the_token_limit(self, client: OpenAI, seed: int) -> None:
        """tool_choice required with a small max_tokens: complete calls only, never markup as content."""
        response = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": WEATHER_QUESTION}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=48,
            seed=seed,
        )
        choice = response.choices[0]
        _assert_no_markup(choice.message.content)
        for call in choice.message.tool_calls or []:
            json.loads(call.function.arguments)  # type: ignore[union-attr]
        if choice.finish_reason == "length":
            assert response.usage is not None and response.usage.completion_tokens == 48

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_streamed_forced_calls_cut_by_the_token_limit(self, server: RunningServer, seed: int) -> None:
        body = chat_body(WEATHER_QUESTION, 48, tools=[WEATHER], tool_choice="required", seed=seed, stream=True)
        body.pop("temperature")
        content = ""
        with httpx.stream("POST", server.base_url + CHAT, json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        content += choice["delta"].get("content") or ""
        _assert_no_markup(content)

    @pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
    def test_tool_choice_none_after_a_tool_round(self, server: RunningServer, stream: bool) -> None:
        """The history shows calls, but with none the output may not open one, and no markup is content."""
        history = [
            {"role": "user", "content": WEATHER_QUESTION},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18}'},
            {"role": "user", "content": "And in Lyon?"},
        ]
        body = {**chat_body(max_tokens=40, tools=[WEATHER], tool_choice="none"), "messages": history, "stream": stream}
        response = httpx.post(server.base_url + CHAT, json=body, timeout=120)
        assert response.status_code == 200
        _assert_no_markup(response.text)


class TestContextOverflow:
    def test_a_limit_past_the_context_is_a_ceiling(self, client: OpenAI) -> None:
        """OpenCode and Qwen Code send max_tokens 32000 to every model: it caps the reply, it is never a 400."""
        completion = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": FRANCE}], max_tokens=32000, temperature=0, stop=["."]
        )
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage is not None and completion.usage.total_tokens <= 8192

    def test_prompt_alone_too_long(self, client: OpenAI) -> None:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 9000}])
        error: Any = raised.value.body
        assert error["param"] == "messages" and LITELLM_CONTEXT_PATTERN in error["message"].lower()


NULLABLE = ("temperature", "top_p", "n", "stream", "stop", "seed", "parallel_tool_calls", "max_tokens",
            "presence_penalty", "frequency_penalty", "response_format", "tool_choice", "tools", "user",
            "stream_options", "logprobs", "top_logprobs")  # fmt: skip


class TestNullsAndModels:
    def test_explicit_nulls_mean_unset(self, server: RunningServer) -> None:
        body = {**chat_body(max_tokens=2), **dict.fromkeys(NULLABLE)}
        body["max_completion_tokens"] = 2
        response = httpx.post(server.base_url + CHAT, json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] <= 2

    def test_explicit_nulls_on_legacy_completions(self, server: RunningServer) -> None:
        body = {"model": "m", "prompt": "Hi", "max_tokens": 2, "temperature": None, "stop": None, "suffix": None}
        assert httpx.post(server.base_url + COMPLETIONS, json=body, timeout=120).status_code == 200

    def test_any_model_id_is_answered(self, client: OpenAI) -> None:
        """Chat accepts any model name, so the model route does too."""
        assert client.models.retrieve("gpt-4o").id == "gpt-4o"
        assert len(client.models.list().data) == 1
