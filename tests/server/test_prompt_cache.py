"""The prompt cache: KV reuse by prefix, checkpoints, normalization, bounds, persistence, and exactness."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_server.chat.prompts import ChatTemplate, normalize_billing_header
from mlx_server.engine.generation import EngineOptions, GenerationEngine
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.vocabulary import GenerationStats, Message
from testbed.requests import ask

from .conftest import RunningServer, start_server, stop_server
from .helpers import cached_tokens, chat_result, collect

pytestmark = pytest.mark.e2e
OPTIONS = EngineOptions(max_batch=4, prefill_batch=4, kv_budget_bytes=2**31)

SYSTEM = (
    "You are a careful coding agent. You read files before editing them, you run the tests after every change, "
    "and you explain each step in one short sentence. Tools available: read_file(path), write_file(path, text), "
    "run(command). Answer in English."
)
BILLING = "x-anthropic-billing-header: cc_version=2.1.36.abc; cc_entrypoint=cli; cch={};"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prompt-cache")


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[RunningServer]:
    """KV cache on, response cache off (so every answer is generated), a warm prompt, persistence, level 2."""
    directory = tmp_path_factory.mktemp("cache-server")
    warm = directory / "warm.json"
    warm.write_text(json.dumps({"system": SYSTEM}))
    running = start_server(
        directory / "server.log",
        {"ANYCLAUDE_DEBUG": "2"},
        ["--response-cache-size", "0", "--prompt-cache-dir", str(cache_dir), "--warm-prompt", str(warm)],
    )
    yield running
    stop_server(running)


class TestPrefixReuse:
    def test_warm_prompt_makes_the_first_request_warm(self, cache_server: RunningServer) -> None:
        """--warm-prompt prefilled the system prompt: the very first conversation reuses it."""
        result = chat_result(cache_server, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
        assert cached_tokens(result) >= 40
        assert "Warm prompt: " in cache_server.log_text()

    def test_next_turn_reuses_the_conversation(self, cache_server: RunningServer) -> None:
        """Turn 2 reuses turn 1's prompt and answer; only the new message is computed."""
        first_messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "List the files."}]
        first = chat_result(cache_server, first_messages)
        second_messages = [
            *first_messages,
            {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "Now read the first one."},
        ]
        second = chat_result(cache_server, second_messages)
        assert cached_tokens(second) >= first["usage"]["prompt_tokens"]

    def test_identical_request_reuses_all_but_one_token(self, cache_server: RunningServer) -> None:
        """cached_tokens is exact: a repeated prompt reuses everything except the one token that must run."""
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Repeat after me: cache."}]
        chat_result(cache_server, messages)
        again = chat_result(cache_server, messages)
        assert cached_tokens(again) == again["usage"]["prompt_tokens"] - 1

    def test_new_conversation_ending_in_a_tool_result_starts_warm(self, cache_server: RunningServer) -> None:
        """The checkpoint at the end of the system prompt serves a new conversation whose last message is a tool's."""
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is in setup.cfg?"},
            {"role": "assistant", "content": "I will read it."},
            {"role": "tool", "content": "[metadata]\nname = demo", "tool_call_id": "call_9"},
        ]
        result = chat_result(cache_server, messages)
        assert cached_tokens(result) >= 40 and cached_tokens(result) < result["usage"]["prompt_tokens"]

    def test_rotating_billing_header_does_not_defeat_the_cache(self, cache_server: RunningServer) -> None:
        """Claude Code's per-request billing line is removed, so the system prompt stays a stable prefix."""
        results = [
            chat_result(
                cache_server,
                [{"role": "system", "content": BILLING.format(value) + "\n" + SYSTEM}, {"role": "user", "content": q}],
            )
            for value, q in (("a1b2c3", "First question?"), ("d4e5f6", "Second question?"))
        ]
        assert cached_tokens(results[1]) >= 40
        assert "Normalized the volatile billing-header line" in cache_server.log_text()

    def test_cache_lines_at_debug_level(self, cache_server: RunningServer) -> None:
        """At level >= 1 each request logs a [Cache] HIT or MISS line with cached and new token counts."""
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which tools do you have?"}]
        chat_result(cache_server, messages)
        chat_result(cache_server, [{"role": "user", "content": "Unrelated and short."}])
        log = cache_server.log_text()
        assert re.search(r'\[Cache\] HIT - prompt: \w+ \{"cached_tokens":\d+,"new_tokens":\d+,.*"source":"\w', log)
        assert re.search(
            r'\[Cache\] MISS - prompt: \w+ \(user message 0 differs [^)]+\) \{"cached_tokens":0,"new_tokens":\d+', log
        )

    def test_cache_report(self, cache_server: RunningServer) -> None:
        """/v1/cache and /health give entries, bytes, hits, misses and tokens saved, within the bounds."""
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Report, please."}]
        for _ in range(2):
            chat_result(cache_server, messages)
        report = httpx.get(f"{cache_server.api_url}/cache", timeout=10).json()["prompt_cache"]
        assert report["entries"] >= 1 and report["checkpoints"] >= 1
        assert 0 < report["bytes"] <= report["max_bytes"]
        assert report["hits"] >= 2 and report["tokens_saved"] > 100
        assert report["entries_detail"][0]["tokens"] > 0
        health = httpx.get(f"{cache_server.base_url}/health", timeout=10).json()
        assert health["prompt_cache"]["entries"] == report["entries"]


class TestMissExplanations:
    """A miss, or a partial hit, says where the prompt left the nearest cached one: token, message, role, words."""

    def conversation(self, question: str) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": "I will look at the repository first."},
            {"role": "user", "content": "Go on."},
        ]

    def test_an_edited_earlier_message(self, cache_server: RunningServer) -> None:
        chat_result(cache_server, self.conversation("Where is the main function defined?"))
        chat_result(cache_server, self.conversation("Where is the parser defined?"))
        miss = httpx.get(f"{cache_server.api_url}/cache", timeout=10).json()["prompt_cache"]["recent_misses"][-1]
        assert miss["diverged_at_message"] == 1 and miss["role"] == "user"
        assert miss["diverged_at_token"] > 40 and miss["cached_tokens"] > 0
        assert miss["cached_text"].lstrip().startswith("main") and miss["new_text"].lstrip().startswith("parser")
        assert "user message 1 differs" in miss["reason"]
        log = cache_server.log_text()
        assert re.search(r'"diverged_at_token":\d+,"diverged_at_message":1,"role":"user"', log)

    def test_a_changed_system_prompt_says_so(self, cache_server: RunningServer) -> None:
        changed = [{"role": "system", "content": SYSTEM.replace("careful", "hasty")}, {"role": "user", "content": "Hi"}]
        chat_result(cache_server, changed)
        miss = httpx.get(f"{cache_server.api_url}/cache", timeout=10).json()["prompt_cache"]["recent_misses"][-1]
        assert miss["diverged_at_message"] == 0 and miss["role"] == "system"
        assert miss["reason"].startswith("the system prompt changed")
        assert miss["cached_text"].lstrip().startswith("careful") and miss["new_text"].lstrip().startswith("hasty")


class TestPersistence:
    def test_checkpoints_survive_a_restart(self, cache_server: RunningServer, cache_dir: Path, tmp_path: Path) -> None:
        """A restarted server loads saved checkpoints; a corrupt or foreign file is skipped with a warning."""
        saved = sorted(cache_dir.glob("*.safetensors"))
        assert saved
        identity = saved[0].name.split("-")[0]
        (cache_dir / f"{identity}-corrupt.safetensors").write_bytes(b"\x00garbage")
        truncated = cache_dir / f"{identity}-truncated.safetensors"
        truncated.write_bytes(saved[0].read_bytes()[:200])
        (cache_dir / "0000000000000000-foreign.safetensors").write_bytes(b"another model's file")
        restarted = start_server(
            tmp_path / "restart.log", {"ANYCLAUDE_DEBUG": "1"}, ["--prompt-cache-dir", str(cache_dir)]
        )
        try:
            log = restarted.log_text()
            assert "skipped" in log and f"{identity}-corrupt.safetensors" in log
            assert re.search(r"Prompt cache: loaded \d+ saved checkpoints", log)
            result = chat_result(
                restarted, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello again"}]
            )
            assert cached_tokens(result) >= 40
        finally:
            stop_server(restarted)


class TestResponseCache:
    def test_deterministic_repeat_is_answered_from_the_cache(self, server: RunningServer) -> None:
        """At temperature 0 a repeated request is answered without generating, with the same text."""
        messages = [{"role": "user", "content": "Name a primary colour."}]
        first, second = (chat_result(server, messages, max_tokens=8) for _ in range(2))
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        assert cached_tokens(second) == second["usage"]["prompt_tokens"]
        assert second["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]

    def test_sampled_requests_are_not_cached(self, server: RunningServer) -> None:
        """Without a seed, temperature > 0 is never answered from the response cache."""
        messages = [{"role": "user", "content": "Name a secondary colour."}]
        for _ in range(2):
            result = chat_result(server, messages, temperature=0.8)
            assert cached_tokens(result) < result["usage"]["prompt_tokens"]

    def test_seeded_requests_are_cached(self, server: RunningServer) -> None:
        """A fixed seed makes sampling deterministic, so its answer may be reused."""
        messages = [{"role": "user", "content": "Name a warm colour."}]
        first, second = (chat_result(server, messages, temperature=0.9, seed=7) for _ in range(2))
        assert second["choices"][0]["message"] == first["choices"][0]["message"]
        assert cached_tokens(second) == second["usage"]["prompt_tokens"]


# ---------------------------------------------------------------------------
# In-process: the engine with and without the cache, on the same weights.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(loaded_model: Any) -> Iterator[tuple[GenerationEngine, GenerationEngine]]:
    cached = GenerationEngine(
        loaded_model, KVPromptCache.for_model(loaded_model.model, loaded_model.identity, 8, 2**30), OPTIONS
    )
    uncached = GenerationEngine(
        loaded_model, KVPromptCache.for_model(loaded_model.model, loaded_model.identity, 0, 2**30), OPTIONS
    )
    yield cached, uncached
    cached.shutdown()
    uncached.shutdown()


def _generate(
    engine: GenerationEngine,
    messages: list[Message],
    max_tokens: int = 8,
    cancel_after: int | None = None,
) -> tuple[str, GenerationStats]:
    tokenizer = engine.loaded.tokenizer
    prompt, prefix = ChatTemplate(tokenizer).tokens_with_prefix(messages)

    request = ask(max_tokens, temperature=0.0).request(prompt, prefix)
    text, stats = asyncio.run(collect(engine, request, end_after=cancel_after))
    assert stats is not None
    return text, stats


def _conversation(topic: str) -> list[Message]:
    return [Message("system", SYSTEM), Message("user", f"Tell me about {topic}.")]


class TestCorrectness:
    def test_cached_answers_equal_uncached_over_interleaved_conversations(
        self, engines: tuple[GenerationEngine, GenerationEngine]
    ) -> None:
        """Two conversations, interleaved for three turns: with the cache, every greedy answer is the same."""
        cached, uncached = engines
        conversations = {topic: _conversation(topic) for topic in ("rivers", "compilers")}
        for turn in range(3):
            for topic, messages in conversations.items():
                with_cache, stats = _generate(cached, messages)
                without_cache, _ = _generate(uncached, messages)
                assert with_cache == without_cache, (topic, turn)
                if turn > 0:
                    assert stats.cached_tokens > len(ChatTemplate(cached.loaded.tokenizer).tokens(messages[:2]))
                messages += [
                    Message("assistant", with_cache),
                    Message("tool", f"result {turn} for {topic}", tool_call_id=f"call_{turn}"),
                ]

    def test_cancelled_request_leaves_the_cache_consistent(
        self, engines: tuple[GenerationEngine, GenerationEngine]
    ) -> None:
        """A request stopped after a few tokens stores consistent state: the next answer is still right."""
        cached, uncached = engines
        messages = _conversation("lighthouses")
        _generate(cached, messages, max_tokens=40, cancel_after=3)
        with_cache, stats = _generate(cached, messages)
        without_cache, _ = _generate(uncached, messages)
        assert with_cache == without_cache
        assert stats.cached_tokens > 0


class TestNormalization:
    @pytest.mark.parametrize(
        ("content", "expected"),
        [
            (BILLING.format("x1") + "\nYou are helpful.", "You are helpful."),
            ("You are helpful.\n" + BILLING.format("x2"), "You are helpful.\n"),
            ("You are helpful.", "You are helpful."),
        ],
    )
    def test_billing_line_is_removed_from_system_messages(self, content: str, expected: str) -> None:
        """Only the billing line goes; the rest of the system prompt is untouched."""
        messages, _ = normalize_billing_header([Message("system", content)])
        assert messages[0].content == expected

    def test_user_messages_are_untouched(self) -> None:
        """A user who pastes such a line keeps it."""
        line = BILLING.format("x3")
        messages, removed = normalize_billing_header([Message("user", line)])
        assert messages[0].content == line and removed == 0
