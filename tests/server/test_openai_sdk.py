"""The official openai SDK against the real server: completions, streams, stop, seeds, usage."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from .conftest import RunningServer
from .helpers import DEFAULT_MODEL

pytestmark = pytest.mark.e2e


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


QUESTION = user("What is the capital of France?")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0, timeout=120) as openai_client:
        yield openai_client


class TestNonStreaming:
    def test_chat_completion_object(self, client: OpenAI) -> None:
        """A chat.completion with id, created, the name of the model that served it, one choice and usage."""
        response = client.chat.completions.create(
            model="any-name-at-all", messages=QUESTION, max_tokens=16, temperature=0
        )
        assert response.id.startswith("chatcmpl-")
        assert response.object == "chat.completion"
        assert response.model == DEFAULT_MODEL  # a name no model or alias has reaches the default model
        assert response.created > 0
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")
        assert response.usage is not None
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        assert response.usage.prompt_tokens_details is not None
        assert 0 <= (response.usage.prompt_tokens_details.cached_tokens or 0) <= response.usage.prompt_tokens

    def test_length_limit(self, client: OpenAI) -> None:
        """max_tokens is honoured exactly, with finish_reason length."""
        response = client.chat.completions.create(
            model="m",
            messages=user("Write a long story about a dragon."),
            max_tokens=5,
            temperature=0,
        )
        assert response.choices[0].finish_reason == "length"
        assert response.usage is not None and response.usage.completion_tokens == 5

    def test_max_completion_tokens(self, client: OpenAI) -> None:
        """max_completion_tokens, the current name, works like max_tokens."""
        response = client.chat.completions.create(
            model="m",
            messages=user("Count to one hundred."),
            max_completion_tokens=3,
            temperature=0,
        )
        assert response.usage is not None and response.usage.completion_tokens == 3

    def test_stop_sequence_is_not_returned(self, client: OpenAI) -> None:
        """Generation ends at a stop sequence, which is not part of the text."""
        full = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=16, temperature=0)
        text = full.choices[0].message.content or ""
        assert " is " in text
        stopped = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=16, temperature=0, stop=[" is "]
        )
        assert stopped.choices[0].message.content == text.split(" is ")[0]
        assert stopped.choices[0].finish_reason == "stop"

    def test_same_seed_same_output(self, client: OpenAI) -> None:
        """Sampling with a seed is reproducible; another seed may differ."""
        prompt = user("Invent a name for a cat.")
        first, second = (
            client.chat.completions.create(model="m", messages=prompt, max_tokens=12, temperature=1.0, seed=1234)
            for _ in range(2)
        )
        assert first.choices[0].message.content == second.choices[0].message.content

    def test_sampling_options_are_accepted(self, client: OpenAI) -> None:
        """top_p, top_k, min_p and the penalties reach mlx-lm's sampler without error."""
        response = client.chat.completions.create(
            model="m",
            messages=QUESTION,
            max_tokens=4,
            temperature=0.7,
            top_p=0.9,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
        )
        assert response.usage is not None and response.usage.completion_tokens >= 1

    def test_every_role_reaches_the_template(self, client: OpenAI) -> None:
        """System, developer, user, assistant and tool messages are all rendered, none dropped."""
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": "You answer briefly."},
            {"role": "developer", "content": "Use plain words."},
            {"role": "user", "content": [{"type": "text", "text": "Hi, "}, {"type": "text", "text": "who are you?"}]},
            {"role": "assistant", "content": "An assistant."},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
            {"role": "user", "content": "Thanks."},
        ]
        short = client.chat.completions.create(model="m", messages=messages[:1] + messages[-1:], max_tokens=1)
        full = client.chat.completions.create(model="m", messages=messages, max_tokens=1)
        assert short.usage is not None and full.usage is not None
        assert full.usage.prompt_tokens > short.usage.prompt_tokens + 20


class TestStreaming:
    def test_stream_matches_non_streaming(self, client: OpenAI) -> None:
        """At temperature 0 the streamed deltas join to the non-streamed text."""
        whole = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=20, temperature=0)
        stream = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=20, temperature=0, stream=True)
        chunks = list(stream)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert len({chunk.id for chunk in chunks}) == 1

    def test_include_usage(self, client: OpenAI) -> None:
        """stream_options.include_usage adds a final chunk with usage and no choices."""
        stream = client.chat.completions.create(
            model="m",
            messages=QUESTION,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        assert all(chunk.usage is None for chunk in chunks[:-1])

    def test_stream_with_stop(self, client: OpenAI) -> None:
        """A stop sequence split across tokens is held back and never streamed."""
        stream = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=16, temperature=0, stream=True, stop=["France"]
        )
        chunks = list(stream)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert "France" not in text
        assert chunks[-1].choices[0].finish_reason == "stop"


class TestModels:
    def test_models_list(self, client: OpenAI) -> None:
        """/v1/models lists the served model."""
        models = client.models.list()
        assert [model.id for model in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]
        assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1").id == "SmolLM2-135M-Instruct.Q4_1"
