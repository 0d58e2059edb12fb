"""Which waiting requests join the batch together: the scheduler's admission, with the prompt cache's answers.

Requests that share a stable prefix (a system prompt and tools) join together
once a checkpoint holds it; while none does, one computes it and the others
wait for its checkpoint instead of computing it too (subagents starting
together).  Holding everyone back behind a prefix the cache already had
admitted one request per step: eight clients' first tokens came 0.95 s late.
"""

from __future__ import annotations

import pytest

from mlx_server.engine.kv_budget import KVBudget
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.scheduler import RequestSignals, Scheduler
from mlx_server.engine.sequence import Job
from mlx_server.vocabulary import GenerationRequest
from testbed.tokenizers import load_tokenizer

PREFIX = list(range(100, 140))  # a system prompt of 40 tokens
WAITING = 4


class IdleBatch:
    active = decoding = 0

    def final_lengths(self) -> list[int]:
        return []

    def pending_prefixes(self) -> set[str]:
        return set()


def planned(prefix_cached: bool, monkeypatch: pytest.MonkeyPatch) -> list[Job]:
    """The jobs the first plan admits when ``WAITING`` requests with the same prefix wait on an idle batch."""
    cache = KVPromptCache(list, "test", 32, 1 << 20)
    monkeypatch.setattr(cache, "has_checkpoint", lambda tokens: prefix_cached and tokens == PREFIX)
    scheduler = Scheduler(8, WAITING, cache, load_tokenizer("qwen3"))
    scheduler.budget = KVBudget(1 << 30, 1)
    for number in range(WAITING):
        request = GenerationRequest([*PREFIX, 7, number], 8, stable_prefix=len(PREFIX), request_id=f"req_{number}")
        scheduler.submit(Job(request), RequestSignals())
    return scheduler.plan(IdleBatch(), []).admitted


def test_requests_whose_shared_prefix_is_cached_join_together(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(planned(prefix_cached=True, monkeypatch=monkeypatch)) == WAITING


def test_while_one_computes_a_shared_prefix_the_others_wait_for_its_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert len(planned(prefix_cached=False, monkeypatch=monkeypatch)) == 1


def test_the_cache_says_who_computes_a_prefix() -> None:
    cache = KVPromptCache(list, "test", 32, 1 << 20)
    assert cache.computes_prefix([*PREFIX, 1], len(PREFIX))
    assert not cache.computes_prefix([*PREFIX, 1], 4), "a prefix too short to keep is never a checkpoint"
    assert not KVPromptCache(list, "test", 0, 1 << 20).computes_prefix([*PREFIX, 1], len(PREFIX)), "cache off"
