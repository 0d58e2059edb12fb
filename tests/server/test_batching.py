"""Continuous batching: requests decode together, and everything per request stays per request.

The engine runs in this process on the real model; requests are driven
concurrently with asyncio, as the HTTP layer drives them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import pytest

from mlx_server.chat.call_formats import HERMES, grammar_writer
from mlx_server.chat.grammars import OutputConstraint, build_grammar
from mlx_server.chat.prompts import ChatTemplate
from mlx_server.chat.tool_parsing import parse_tool_calls
from mlx_server.engine.generation import EngineOptions, GenerationEngine
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.vocabulary import (
    GeneratedText,
    GenerationFinished,
    GenerationStats,
    Message,
    Tool,
)
from testbed.requests import Ask, ask

from .conftest import RunningServer, start_server, stop_server
from .helpers import CHAT, LONG_ANSWER, WEATHER_PARAMETERS, chat_body

pytestmark = pytest.mark.e2e

BYTES_PER_TOKEN = 46_080  # SmolLM2-135M, float32: 30 layers x 3 KV heads x 64 x 2 (keys, values) x 4 bytes
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "Why is the sky blue?",
]


@dataclass
class Outcome:
    text: str
    stats: GenerationStats


@pytest.fixture(scope="module")
def engine(loaded_model: Any) -> Iterator[GenerationEngine]:
    cache = KVPromptCache.for_model(loaded_model.model, loaded_model.identity, 16, 2**30)
    running = GenerationEngine(loaded_model, cache, EngineOptions(max_batch=8, prefill_batch=8, kv_budget_bytes=2**31))
    yield running
    running.shutdown()


def prompt_for(engine: GenerationEngine, question: str) -> list[int]:
    return ChatTemplate(engine.tokenizer).tokens([Message("user", question)])


async def generate(
    engine: GenerationEngine,
    prompt: list[int],
    settings: Ask,
    stable_prefix: int = 0,
    cancel_after: int | None = None,
) -> Outcome:
    parts: list[str] = []
    stats: GenerationStats | None = None
    events = engine.stream(settings.request(prompt, stable_prefix))
    async for event in events:
        if isinstance(event, GeneratedText):
            parts.append(event.text)
        elif isinstance(event, GenerationFinished):
            stats = event.stats
        if cancel_after is not None and len(parts) >= cancel_after:
            break
    await events.aclose()
    if stats is None:  # left early: the stream was abandoned, as a disconnected client abandons it
        stats = GenerationStats(prompt_tokens=len(prompt), finish_reason="cancelled")
    return Outcome("".join(parts), stats)


def alone(engine: GenerationEngine, prompt: list[int], settings: Ask) -> Outcome:
    return asyncio.run(generate(engine, prompt, settings))


def together(engine: GenerationEngine, *requests: tuple[list[int], Ask]) -> list[Outcome]:
    async def run() -> list[Outcome]:
        return list(await asyncio.gather(*(generate(engine, prompt, settings) for prompt, settings in requests)))

    return asyncio.run(run())


WEATHER = Tool("get_weather", "Get the current weather for a city", WEATHER_PARAMETERS)


class TestPerRequestSettings:
    def test_greedy_outputs_equal_their_solo_outputs(self, engine: GenerationEngine) -> None:
        """At temperature 0, six different prompts with different lengths give, together, what each gives alone."""
        requests = [
            (prompt_for(engine, question), ask(8 + 3 * index, temperature=0.0))
            for index, question in enumerate(QUESTIONS)
        ]
        solo = [alone(engine, *request) for request in requests]
        batched = together(engine, *requests)
        assert [outcome.text for outcome in batched] == [outcome.text for outcome in solo]
        assert [outcome.stats.completion_tokens for outcome in batched] == [
            outcome.stats.completion_tokens for outcome in solo
        ]

    def test_mixed_settings_stops_and_grammars_in_one_batch(self, engine: GenerationEngine) -> None:
        """A stop sequence, a length limit, a forced tool call and a sampled request finish correctly side by side."""
        constraint = OutputConstraint(tools=[WEATHER], tool_mode="required", forced_function="get_weather")
        grammar = build_grammar(constraint, grammar_writer(engine.tokenizer))
        weather_prompt = ChatTemplate(engine.tokenizer).tokens([Message("user", "Weather in Paris?")], [WEATHER])
        question = prompt_for(engine, QUESTIONS[0])
        free = alone(engine, question, ask(40, temperature=0.0)).text
        stop = free.split()[2]  # a word the greedy answer writes: the stop sequence ends the text before it
        requests = [
            (question, ask(40, temperature=0.0, stop=(stop,))),
            (prompt_for(engine, LONG_ANSWER), ask(7, temperature=0.0)),
            (weather_prompt, ask(60, grammar, temperature=0.0)),
            (prompt_for(engine, QUESTIONS[2]), ask(16, temperature=0.9, top_p=0.9, top_k=40)),
        ]
        stopped, limited, called, sampled = together(engine, *requests)
        assert stopped.stats.finish_reason == "stop" and stopped.stats.stop_sequence == stop
        assert stopped.text == free[: free.index(stop)]
        assert limited.stats.finish_reason == "length" and limited.stats.completion_tokens == 7
        _, calls = parse_tool_calls(called.text, HERMES, {"get_weather"})
        assert [call.name for call in calls] == ["get_weather"]
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER_PARAMETERS)
        assert called.stats.finish_reason == "stop"
        assert 1 <= sampled.stats.completion_tokens <= 16

    def test_a_seeded_request_is_reproducible_in_a_batch(self, engine: GenerationEngine) -> None:
        """Its own random key: the same seed gives the same text alone and among other sampled requests."""
        seeded = (prompt_for(engine, QUESTIONS[5]), ask(24, temperature=1.0, seed=1234))
        others = [(prompt_for(engine, question), ask(24, temperature=1.0)) for question in QUESTIONS[:3]]
        solo = alone(engine, *seeded).text
        batched = together(engine, *others, seeded)[-1].text
        assert batched == solo


class TestLifecycle:
    def test_a_request_that_leaves_does_not_stop_the_others(self, engine: GenerationEngine) -> None:
        """One stream abandoned after three pieces; the others run to their limits."""

        async def run() -> list[Outcome]:
            long = prompt_for(engine, LONG_ANSWER)
            settings = ask(30, temperature=0.0)
            return list(
                await asyncio.gather(
                    generate(engine, long, settings, cancel_after=3),
                    generate(engine, prompt_for(engine, QUESTIONS[1]), ask(20, temperature=0.0)),
                    generate(engine, long, settings),
                )
            )

        left, first, second = asyncio.run(run())
        assert left.stats.finish_reason == "cancelled"
        assert first.stats.finish_reason in ("stop", "length") and first.text
        assert second.stats.finish_reason == "length" and second.stats.completion_tokens == 30

    def test_batched_requests_reuse_the_prompt_cache(self, engine: GenerationEngine) -> None:
        """Two conversations with one system prompt, together: the second turns start from their first turns."""
        system = "You are a careful assistant who answers in one short sentence. " * 8
        conversations = [[Message("system", system), Message("user", question)] for question in QUESTIONS[:2]]
        settings = ask(8, temperature=0.0)

        def requests() -> list[tuple[list[int], Ask, int]]:
            template = ChatTemplate(engine.tokenizer)
            rendered = [template.tokens_with_prefix(messages) for messages in conversations]
            return [(prompt, settings, prefix) for prompt, prefix in rendered]

        async def turn() -> list[Outcome]:
            return list(await asyncio.gather(*(generate(engine, *request) for request in requests())))

        first = asyncio.run(turn())
        for messages, outcome in zip(conversations, first):
            messages += [Message("assistant", outcome.text), Message("user", "Thanks. And why?")]
        second = asyncio.run(turn())
        for before, after in zip(first, second):
            assert after.stats.cached_tokens >= before.stats.prompt_tokens


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A KV budget that holds one 256-token sequence (46,080 bytes a token for this model), not two."""
    arguments = ["--kv-budget", str(BYTES_PER_TOKEN * 400), "--response-cache-size", "0", "--prompt-cache-size", "0"]
    running = start_server(tmp_path_factory.mktemp("budget") / "server.log", arguments=arguments)
    yield running
    stop_server(running)


class TestMemoryBudget:
    def test_a_request_that_does_not_fit_beside_another_waits(self, budgeted: RunningServer) -> None:
        """Two requests that may each grow to ~70 tokens (each a 256-token step): the second waits, then completes."""
        body = chat_body(LONG_ANSWER, max_tokens=32)
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(httpx.post(budgeted.base_url + CHAT, json=body, timeout=300))
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        seen_waiting = False
        while any(thread.is_alive() for thread in threads):
            batch = httpx.get(budgeted.base_url + "/health", timeout=10).json()["batch"]
            assert batch["running"] <= 1
            seen_waiting |= batch["waiting"] == 1
            time.sleep(0.05)  # polling without a pause takes the cores the two requests decode on
        for thread in threads:
            thread.join()
        assert [response.status_code for response in results] == [200, 200]
        assert seen_waiting

    def test_a_request_that_could_never_fit_is_a_400(self, budgeted: RunningServer) -> None:
        """A prompt past what the budget can hold for one sequence: a 400 in the context-overflow wording."""
        response = httpx.post(budgeted.base_url + CHAT, json=chat_body("word " * 300, max_tokens=4), timeout=60)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 256 tokens" in response.json()["error"]["message"]

    def test_a_limit_past_the_budget_is_a_ceiling(self, budgeted: RunningServer) -> None:
        """max_tokens beyond what the budget holds for the sequence generates until it is full, never refused."""
        long_prompt = " ".join([LONG_ANSWER] * 16)  # ~220 tokens: the ~35 left are generated
        response = httpx.post(budgeted.base_url + CHAT, json=chat_body(long_prompt, max_tokens=300), timeout=300)
        assert response.status_code == 200
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] > 200 and usage["completion_tokens"] > 0
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 256

    def test_health_and_metrics_show_the_batch(self, budgeted: RunningServer) -> None:
        assert httpx.post(budgeted.base_url + CHAT, json=chat_body(max_tokens=4), timeout=60).status_code == 200
        health = httpx.get(budgeted.base_url + "/health", timeout=10).json()["batch"]
        assert health["max_batch"] == 16 and health["kv_budget_bytes"] == BYTES_PER_TOKEN * 400
        assert health["kv_bytes_per_token"] == BYTES_PER_TOKEN
        assert health["decode_steps"] >= 4 and health["tokens_per_step"] > 0
        metrics = httpx.get(budgeted.base_url + "/metrics", timeout=10).text
        for name in (
            "mlx_server_batch_size_bucket",
            "mlx_server_batch_running_sequences",
            "mlx_server_kv_budget_bytes",
        ):
            assert name in metrics
