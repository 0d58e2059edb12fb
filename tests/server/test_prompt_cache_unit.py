"""The prompt cache's own rules, on small synthetic KV caches (no model): lookup, hand-out, bounds, files.

Each "KV cache" here is two mlx-lm ``KVCache`` layers filled with one number
per token, so a test can read back exactly which tokens a cache holds.  The
rules for caches that cannot step back, and for sessions, are in
``test_cache_lanes.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mlx_server.engine.cache_entries import (
    CHECKPOINT,
    CONVERSATION,
    MIN_REUSED_TOKENS,
    CacheEntry,
    EntryKind,
    best_reuse,
)
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.vocabulary import Lane

LAYERS = 2
BYTES_PER_TOKEN = LAYERS * 2 * 4  # keys and values, one float32 each per layer


def empty_cache() -> list[Any]:
    return [KVCache() for _ in range(LAYERS)]


def kv_state(tokens: list[int]) -> list[Any]:
    """A cache whose keys and values at position i are tokens[i]."""
    cache = empty_cache()
    data = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
    for layer in cache:
        layer.update_and_fetch(data, data)
    mx.eval([layer.state for layer in cache])
    return cache


def held(cache: list[Any]) -> list[int]:
    keys = cache[0].keys[..., : cache[0].offset, :]
    return [int(value) for value in np.array(keys).reshape(-1)]


def new_cache(max_entries: int = 8, max_bytes: int = 2**30, directory: Path | None = None) -> KVPromptCache:
    return KVPromptCache(empty_cache, "unit-model", max_entries, max_bytes, directory)


def tokens(base: int, count: int = 20) -> list[int]:
    return [base + index for index in range(count)]


def entry(token_list: list[int], kind: EntryKind = CONVERSATION, lane: Lane | None = None) -> CacheEntry:
    return CacheEntry(np.asarray(token_list, dtype=np.int64), empty_cache(), 0, kind, len(token_list), lane)


class TestLookup:
    def test_the_longest_usable_prefix_wins(self) -> None:
        entries = [entry([*tokens(1, 12), 99]), entry(tokens(1, 30)), entry([7, 8])]
        reuse = best_reuse(entries, np.array([*tokens(1, 25), 0]), None)
        assert reuse.entry is entries[1] and reuse.usable == 25

    def test_ties_go_to_the_own_lane_then_conversations_then_the_most_recent(self) -> None:
        request = np.array([*tokens(1, 20), 0])
        recent, older = entry(tokens(1, 20)), entry(tokens(1, 21))
        assert best_reuse([recent, older], request, None).entry is recent
        checkpoint, conversation = entry(tokens(1, 20), CHECKPOINT), entry([*tokens(1, 20), 5])
        assert best_reuse([checkpoint, conversation], request, None).entry is conversation
        other, own = (
            entry(tokens(1, 20), lane=Lane("test", "other")),
            entry([*tokens(1, 20), 6], lane=Lane("test", "own")),
        )
        assert best_reuse([other, own], request, Lane("test", "own")).entry is own

    def test_nothing_shared(self) -> None:
        reuse = best_reuse([entry([5, 6])], np.array([1, 2]), None)
        assert reuse.entry is None and reuse.nearest is None and reuse.usable == 0

    def test_the_key_is_computed_once(self) -> None:
        made = entry([1, 2, 3])
        made.tokens = np.array([9, 9, 9])
        assert made.key == entry([1, 2, 3]).key and made.key != entry([1, 2, 3], CHECKPOINT).key


class TestHandOut:
    def test_a_full_extension_takes_the_entry_without_copying(self) -> None:
        kv = new_cache()
        state = kv_state(tokens(100, 40))
        kv.release(state, tokens(100, 40), 40)
        lease = kv.acquire([*tokens(100, 40), 7, 8, 9])
        assert lease.source == "extended" and lease.cached_tokens == 40 and lease.cache is state
        assert kv.stats().entries == 0 and lease.divergence is None

    def test_a_partial_match_copies_only_the_shared_prefix(self) -> None:
        kv = new_cache()
        state = kv_state(tokens(100, 40))
        kv.release(state, tokens(100, 40), 40)
        lease = kv.acquire([*tokens(100, 20), 1, 2, 3])
        assert lease.source == "copied-prefix" and lease.cached_tokens == 20
        assert lease.cache is not state and held(lease.cache) == tokens(100, 20) and held(state) == tokens(100, 40)
        assert kv.stats().entries == 1
        assert lease.divergence is not None and lease.divergence.at_token == 20
        assert lease.divergence.cached == tuple(tokens(120, 12)) and lease.divergence.prompt == (1, 2, 3)

    def test_an_unused_generated_tail_is_trimmed_not_copied(self) -> None:
        """The next turn diverges inside the entry's generated tokens: the entry is taken and its tail trimmed."""
        kv = new_cache()
        prompt, generated = tokens(100, 30), [5, 6, 7, 8]
        state = kv_state(prompt + generated)
        kv.release(state, prompt + generated, len(prompt))
        lease = kv.acquire([*prompt, 5, 6, 99, 98])
        assert lease.source == "extended" and lease.cached_tokens == 32 and lease.cache is state
        assert held(state) == [*prompt, 5, 6]

    def test_at_least_one_token_is_left_to_compute(self) -> None:
        kv = new_cache()
        kv.release(kv_state(tokens(100)), tokens(100), 20)
        assert kv.acquire(tokens(100)).cached_tokens == 19

    def test_a_short_match_is_a_miss(self) -> None:
        kv = new_cache()
        kv.release(kv_state(tokens(100)), tokens(100), 20)
        lease = kv.acquire([*tokens(100, MIN_REUSED_TOKENS - 1), 1, 2, 3])
        assert lease.source == "miss" and lease.cached_tokens == 0
        assert lease.divergence is not None and lease.divergence.at_token == MIN_REUSED_TOKENS - 1

    def test_checkpoints_are_copied_and_stay(self) -> None:
        kv = new_cache()
        prefix = tokens(500, 30)
        assert kv.add_checkpoint(kv_state(prefix), prefix)
        for suffix in ([1, 2], [3, 4]):
            lease = kv.acquire(prefix + suffix)
            assert lease.source == "checkpoint" and held(lease.cache) == prefix
        assert kv.stats().checkpoints == 1 and kv.has_checkpoint(prefix)


class TestBounds:
    def test_lru_is_refreshed_on_use(self) -> None:
        """A hit makes an entry recent: the least recently used one is evicted, not the oldest inserted."""
        kv = new_cache(max_entries=2)
        first, second, third = tokens(1000), tokens(2000), tokens(3000)
        for state_tokens in (first, second):
            kv.release(kv_state(state_tokens), state_tokens, 20)
        assert kv.acquire([*first[:12], 5]).cached_tokens == 12  # a partial hit: copied, entry refreshed
        kv.release(kv_state(third), third, 20)
        assert kv.acquire([*first, 1]).cached_tokens == 20
        assert kv.acquire([*second, 1]).cached_tokens == 0

    def test_the_byte_bound_holds_and_an_oversized_entry_is_not_kept(self) -> None:
        one_entry = 256 * BYTES_PER_TOKEN  # KVCache allocates 256 tokens at a time
        kv = new_cache(max_entries=10, max_bytes=int(one_entry * 2.5))
        for base in range(5):
            kv.release(kv_state(tokens(base * 100)), tokens(base * 100), 20)
            assert kv.stats().bytes <= kv.max_bytes
        assert kv.stats().entries == 2 and kv.stats().evictions == 3
        tiny = new_cache(max_bytes=one_entry // 2)
        tiny.release(kv_state(tokens(0)), tokens(0), 20)
        assert tiny.stats().entries == 0 and tiny.stats().bytes == 0

    def test_a_longer_turn_replaces_its_prefix(self) -> None:
        kv = new_cache()
        kv.release(kv_state(tokens(100, 20)), tokens(100, 20), 20)
        kv.release(kv_state(tokens(100, 30)), tokens(100, 30), 30)
        assert kv.stats().entries == 1

    def test_trim_to_makes_room_for_running_sequences(self) -> None:
        kv = new_cache()
        for base in range(3):
            kv.release(kv_state(tokens(base * 100)), tokens(base * 100), 20)
        kv.trim_to(256 * BYTES_PER_TOKEN)
        assert kv.stats().entries == 1 and kv.acquire([*tokens(200), 1]).cached_tokens == 20

    def test_zero_entries_turns_reuse_off(self) -> None:
        kv = new_cache(max_entries=0)
        kv.release(kv_state(tokens(100)), tokens(100), 20)
        assert kv.acquire([*tokens(100), 1]).cached_tokens == 0 and not kv.add_checkpoint(
            kv_state(tokens(1)), tokens(1)
        )


class TestFiles:
    def test_only_checkpoints_are_saved_and_they_come_back_pinned(self, tmp_path: Path) -> None:
        kv = new_cache(directory=tmp_path)
        prefix = tokens(700, 30)
        kv.add_checkpoint(kv_state(prefix), prefix)
        kv.release(kv_state(tokens(900)), tokens(900), 20)
        assert kv.save_checkpoints() == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
        restarted = new_cache(directory=tmp_path)
        assert restarted.stats().checkpoints == restarted.stats().entries == 1
        lease = restarted.acquire([*prefix, 1])
        assert lease.source == "checkpoint" and held(lease.cache) == prefix

    @pytest.mark.parametrize("damage", ["truncated", "foreign model"])
    def test_unreadable_files_are_skipped(self, tmp_path: Path, damage: str) -> None:
        kv = new_cache(directory=tmp_path)
        prefix = tokens(700, 30)
        kv.add_checkpoint(kv_state(prefix), prefix)
        (saved,) = tmp_path.glob("*.safetensors")
        if damage == "truncated":
            saved.write_bytes(saved.read_bytes()[:300])
        else:
            saved.rename(saved.with_name(saved.name.replace("unit-model", "other-model")))
        restarted = new_cache(directory=tmp_path)
        assert restarted.stats().entries == 0 and restarted.acquire([*prefix, 1]).cached_tokens == 0
