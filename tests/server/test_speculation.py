"""Prompt-lookup speculative decoding: the same output as plain decoding, fewer passes where the output copies.

In-process engines over the default model, one with ``--speculative off``
and one with ``prompt-lookup``; the prompts ask for text the context holds
(a file repeated, an edit's ``old_string``), so drafts are made and kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_server.chat.call_formats import HERMES, grammar_writer
from mlx_server.chat.grammars import OutputConstraint, build_grammar
from mlx_server.chat.tool_parsing import parse_tool_calls
from mlx_server.engine.generation import EngineOptions, GenerationEngine
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.vocabulary import (
    GeneratedText,
    GenerationFinished,
    GenerationStats,
    SpeculativeMode,
    Tool,
)
from testbed.requests import ask

pytestmark = pytest.mark.e2e

CODE = "\n".join(f"def scale_{i}(value):\n    return value * {i} + {i * i}  # step {i}" for i in range(12))
EDIT = Tool(
    "edit_file",
    parameters={
        "type": "object",
        "properties": {"path": {"enum": ["scale.py"]}, "old_string": {"type": "string", "maxLength": 400}},
        "required": ["path", "old_string"],
    },
)


class Engines:
    """The two engines and the tokenizer; ``run`` sends one request to one of them."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.off = self._engine(loaded, "off")
        self.on = self._engine(loaded, "prompt-lookup")
        self._plain: dict[Any, tuple[str, GenerationStats]] = {}  # plain decoding is deterministic: run once each

    @staticmethod
    def _engine(loaded: Any, mode: SpeculativeMode) -> GenerationEngine:
        cache = KVPromptCache.for_model(loaded.model, loaded.identity, 8, 2**30)
        return GenerationEngine(loaded, cache, EngineOptions(8, 8, 2**31, None, mode))

    def prompt(self, user: str, reply_start: str = "") -> list[int]:
        text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply_start}"
        tokens: list[int] = self.tokenizer.encode(text)
        return tokens

    def run(
        self,
        engine: GenerationEngine,
        prompt: list[int],
        max_tokens: int = 32,
        grammar: str | None = None,
        **sampling: Any,
    ) -> tuple[str, GenerationStats]:
        request = ask(max_tokens, grammar, **{"temperature": 0.0, **sampling}).request(prompt)
        if engine is not self.off:
            return asyncio.run(engine.complete(request))
        key = (tuple(prompt), max_tokens, grammar, tuple(sorted(sampling.items())))
        if key not in self._plain:
            self._plain[key] = asyncio.run(engine.complete(request))
        return self._plain[key]

    def both(self, prompt: list[int], **settings: Any) -> tuple[str, str, GenerationStats]:
        plain, _ = self.run(self.off, prompt, **settings)
        speculated, stats = self.run(self.on, prompt, **settings)
        return plain, speculated, stats


@pytest.fixture(scope="module")
def engines(loaded_model: Any) -> Iterator[Engines]:
    pair = Engines(loaded_model)
    yield pair
    pair.off.shutdown()
    pair.on.shutdown()


class TestSameOutput:
    def test_greedy_copying_drafts_keeps_them_and_equals_plain_decoding(self, engines: Engines) -> None:
        plain, speculated, stats = engines.both(engines.prompt(f"Repeat this file exactly:\n{CODE}", CODE[:40]))
        assert speculated == plain
        assert stats.drafted_tokens > 0 and stats.accepted_tokens > 0

    def test_greedy_prose_equals_plain_decoding(self, engines: Engines) -> None:
        plain, speculated, _ = engines.both(engines.prompt("Write a short story about a lighthouse keeper."))
        assert speculated == plain

    def test_a_seeded_sampled_request_is_reproducible_and_equals_plain_decoding(self, engines: Engines) -> None:
        prompt = engines.prompt(f"Repeat this file exactly:\n{CODE}", CODE[:40])
        plain, speculated, stats = engines.both(prompt, temperature=0.7, seed=11)
        again, _ = engines.run(engines.on, prompt, temperature=0.7, seed=11)
        assert speculated == plain == again
        assert stats.drafted_tokens > 0

    def test_a_stop_string_inside_a_kept_draft_ends_the_output_there(self, engines: Engines) -> None:
        prompt = engines.prompt(f"Repeat this file exactly:\n{CODE}", CODE[:40])
        whole, _ = engines.run(engines.off, prompt)
        stop = whole[len(whole) // 2 :][:6]  # text the output will reach, mid-way
        plain, speculated, stats = engines.both(prompt, stop=(stop,))
        assert speculated == plain == whole[: whole.index(stop)]
        assert stats.finish_reason == "stop" and stats.accepted_tokens > 0

    def test_a_length_limit_inside_a_kept_draft_ends_the_output_there(self, engines: Engines) -> None:
        prompt = engines.prompt(f"Repeat this file exactly:\n{CODE}", CODE[:40])
        plain, speculated, stats = engines.both(prompt, max_tokens=37)
        assert speculated == plain and stats.completion_tokens == 37 and stats.finish_reason == "length"


def test_a_forced_edit_call_copies_old_string_under_its_grammar(engines: Engines) -> None:
    """The grammar checks every kept draft token; the call validates and matches plain decoding."""
    writer = grammar_writer(engines.tokenizer)
    grammar = build_grammar(
        OutputConstraint(tools=[EDIT], tool_mode="required", parallel_calls=False, call_format=HERMES,
                         eos=tuple(sorted(engines.tokenizer.eos_token_ids))),
        writer,
    )  # fmt: skip
    block = "\n".join(CODE.splitlines()[4:8])
    prompt = engines.prompt(
        f"File scale.py:\n{CODE}\n\nReplace this block of scale.py:\n{block}\nCall edit_file with old_string set to "
        "exactly that block."
    )
    plain, speculated, stats = engines.both(prompt, grammar=grammar, max_tokens=120)
    assert speculated == plain
    (call,) = parse_tool_calls(speculated, HERMES, {"edit_file"})[1]
    jsonschema.validate(json.loads(call.arguments), EDIT.parameters_schema())
    assert stats.drafted_tokens > 0


def stored_conversation(engines: Engines, prompt: list[int]) -> Any:
    """The speculating engine's stored conversation that began with ``prompt`` (waits for the worker to store it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for entry in engines.on.prompt_cache.entries():
            if entry.kind == "conversation" and [int(token) for token in entry.tokens[: len(prompt)]] == prompt:
                return entry
        time.sleep(0.05)
    raise AssertionError("no conversation was stored for the prompt")


def largest_key_difference(engines: Engines, entry: Any) -> float:
    """How far an entry's keys are from a fresh prefill of its tokens (rounding: < 1e-3; a stale draft's: far more)."""
    tokens = [int(token) for token in entry.tokens]

    def compare() -> float:
        fresh = make_prompt_cache(engines.loaded.model)
        engines.loaded.model(mx.array([tokens]), cache=fresh)
        assert all(layer.offset == len(tokens) for layer in entry.cache)
        return max(
            float(mx.abs(kept.keys[..., : len(tokens), :] - new.keys[..., : len(tokens), :]).max())
            for kept, new in zip(entry.cache, fresh)
        )

    result: float = engines.on.on_worker(compare)
    return result


def test_rejected_drafts_leave_no_trace_in_the_prompt_cache(engines: Engines) -> None:
    """The conversation stored back holds exactly its tokens: the KV of every rejected draft was trimmed."""
    prompt = engines.prompt(f"Repeat this file exactly:\n{CODE}", CODE[:40])
    _, stats = engines.run(engines.on, prompt)
    assert stats.drafted_tokens > stats.accepted_tokens  # some drafts were rejected
    assert largest_key_difference(engines, stored_conversation(engines, prompt)) < 1e-3


def leave_after_a_few_pieces(engine: GenerationEngine, prompt: list[int]) -> int:
    """Stream ``prompt`` and close the stream after six pieces of text, as a client that disconnects."""

    async def leave() -> int:
        stream = engine.stream(ask(160, temperature=0.0).request(prompt))
        pieces = 0
        async for event in stream:
            pieces += isinstance(event, GeneratedText)
            if pieces == 6 or isinstance(event, GenerationFinished):
                break
        await stream.aclose()
        return pieces

    return asyncio.run(leave())


def test_a_request_cancelled_mid_draft_leaves_the_cache_exact(engines: Engines) -> None:
    """A client that leaves while drafts are kept: what is stored holds its tokens, and the next run is unchanged."""
    prompt = engines.prompt(f"Copy this file, then stop:\n{CODE}", CODE[:40])
    plain, _ = engines.run(engines.off, prompt)
    assert leave_after_a_few_pieces(engines.on, prompt) == 6
    entry = stored_conversation(engines, prompt)
    assert len(entry.tokens) < len(prompt) + 160, "it left before the end"
    assert largest_key_difference(engines, entry) < 1e-3
    again, stats = engines.run(engines.on, prompt)
    assert again == plain and stats.cached_tokens >= len(prompt) - 1


def test_the_drafts_of_a_client_that_left_count_in_the_engine_totals(engines: Engines) -> None:
    """/health's acceptance rate counts every sequence that drafted, not only those whose client read to the end."""
    before = engines.on.stats()
    assert leave_after_a_few_pieces(engines.on, engines.prompt(f"Repeat this file exactly:\n{CODE}", CODE[:40])) == 6
    deadline = time.monotonic() + 60
    while engines.on.stats().drafted_tokens == before.drafted_tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    after = engines.on.stats()
    assert after.drafted_tokens > before.drafted_tokens and after.accepted_tokens > before.accepted_tokens
