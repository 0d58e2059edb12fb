"""Caches that cannot step back resume from snapshots, and sessions keep their conversations (no model).

The synthetic caches are an mlx-lm ``KVCache`` (reads back which tokens it
holds) beside an ``ArraysCache`` (a recurrent state: it cannot be trimmed),
so an entry is reusable only by a prompt that extends all of it, as with
Qwen3.5's linear attention or a wrapped sliding window.
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache

from mlx_server.engine.cache_entries import CHECKPOINT, CONVERSATION, SNAPSHOT, CacheEntry, EntryKind
from mlx_server.engine.cache_lanes import LANE_IDLE_SECONDS, EvictionPolicy, LaneActivity, fair_share, superseded
from mlx_server.engine.cache_report import describe_lanes
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.vocabulary import Lane

A, B, SESSION, MAIN = Lane("test", "a"), Lane("test", "b"), Lane("test", "session"), Lane("test", "main")
ACTIVE, IDLE, GREEDY, MODEST = (
    Lane("test", "active"),
    Lane("test", "idle"),
    Lane("test", "greedy"),
    Lane("test", "modest"),
)


def subagent_lane(number: int) -> Lane:
    """A lane of its own per agent (these tests' "agents" are sessions with one conversation each)."""
    return Lane("test", f"agent {number}")


ENTRY_BYTES = 256 * 2 * 4 + 4  # a 256-token KV step of one float32 key and value, and the recurrent state


def hybrid_cache() -> list[Any]:
    return [KVCache(), ArraysCache(1)]


def hybrid_state(tokens: list[int]) -> list[Any]:
    cache = hybrid_cache()
    data = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
    cache[0].update_and_fetch(data, data)
    cache[1][0] = mx.array([float(len(tokens))])
    mx.eval([layer.state for layer in cache])
    return cache


def held(cache: list[Any]) -> list[int]:
    keys = cache[0].keys[..., : cache[0].offset, :]
    return [int(value) for value in np.array(keys).reshape(-1)]


def tokens(base: int, count: int = 20) -> list[int]:
    return [base + index for index in range(count)]


def hybrid_prompt_cache(max_entries: int = 16, max_bytes: int = 2**30) -> KVPromptCache:
    return KVPromptCache(hybrid_cache, "unit-hybrid", max_entries, max_bytes)


class TestCachesThatCannotStepBack:
    def test_they_need_snapshots(self) -> None:
        assert hybrid_prompt_cache().needs_snapshots

    def test_a_conversation_the_next_prompt_leaves_is_not_used(self) -> None:
        """The reply re-rendered differently: the entry holds tokens the new prompt does not have, and no trim helps."""
        cache = hybrid_prompt_cache()
        history, reply = tokens(100, 30), [7, 7, 7]
        cache.release(hybrid_state(history + reply), history + reply, len(history))
        lease = cache.acquire([*history, 8, 8, 8, 1])
        assert lease.source == "miss" and lease.cached_tokens == 0
        assert lease.divergence is not None and lease.divergence.at_token == len(history)

    def test_the_next_turn_resumes_from_the_snapshot_of_the_history(self) -> None:
        cache = hybrid_prompt_cache()
        history, reply = tokens(100, 30), [7, 7, 7]
        cache.add_snapshot(hybrid_state(history), history, SESSION, after_user=True)
        cache.release(hybrid_state(history + reply), history + reply, len(history) + 1, SESSION)
        lease = cache.acquire([*history, 8, 8, 8, 1], SESSION)
        assert lease.source == "snapshot" and lease.cached_tokens == len(history)
        assert held(lease.cache) == history, "a copy of the snapshot, which stays for a retry"
        assert cache.has_snapshot(history)

    def test_a_prompt_that_extends_the_whole_entry_takes_it(self) -> None:
        cache = hybrid_prompt_cache()
        history = tokens(100, 30)
        cache.release(hybrid_state(history), history, len(history))
        lease = cache.acquire([*history, 1, 2])
        assert lease.source == "extended" and lease.cached_tokens == len(history)

    def test_a_checkpoint_is_never_taken_from_a_cache_past_it(self) -> None:
        """A copy of an untrimmable cache holds all of it: it cannot stand for a shorter prefix."""
        cache = hybrid_prompt_cache()
        assert not cache.add_checkpoint(hybrid_state(tokens(100, 30)), tokens(100, 20))
        assert cache.add_checkpoint(hybrid_state(tokens(100, 20)), tokens(100, 20))


def entry(
    token_list: list[int],
    lane: Lane | None,
    kind: EntryKind = CONVERSATION,
    turn: int = 0,
    after_user: bool = False,
    age: float = 0.0,
) -> CacheEntry:
    made = CacheEntry(np.asarray(token_list), hybrid_cache(), 1000, kind, len(token_list), lane, turn, after_user)
    made.last_used -= age
    return made


def order_of(
    entries: list[CacheEntry],
    lanes: dict[Lane, float],
    max_bytes: int = 10**9,
    trimmable: bool = True,
    requests: int = 2,
) -> list[CacheEntry]:
    """The eviction order of ``entries`` now, ``lanes`` being each lane's last request (``requests`` made each)."""
    activity = {lane: LaneActivity(seen, requests) for lane, seen in lanes.items()}
    return EvictionPolicy(entries, activity, time.monotonic(), max_bytes, trimmable).order()


class TestSuperseding:
    def test_a_sessions_newest_turn_replaces_its_older_turns(self) -> None:
        older = entry(tokens(1, 20), A, turn=1)
        other_session = entry(tokens(1, 20), B, turn=1)
        side = entry(tokens(500, 20), A)
        newest = entry([*tokens(1, 20), 9, 9], A, turn=2)
        assert superseded(newest, [older, other_session, side]) == [older]

    def test_a_reply_that_re_rendered_differently_is_still_an_older_turn(self) -> None:
        """The old entry's prompt is a prefix of the new one, its generated tail is not."""
        older = CacheEntry(np.asarray([*tokens(1, 20), 7, 7]), hybrid_cache(), 1000, CONVERSATION, 20, A, 1)
        newest = entry([*tokens(1, 20), 8, 8, 5], A, turn=2)
        assert superseded(newest, [older]) == [older]

    def test_the_snapshot_after_the_users_message_stays_until_a_newer_one(self) -> None:
        at_query = entry(tokens(1, 20), A, SNAPSHOT, after_user=True)
        after_tool = entry(tokens(1, 30), A, SNAPSHOT)
        assert superseded(after_tool, [at_query]) == []
        later_tool = entry(tokens(1, 40), A, SNAPSHOT)
        assert superseded(later_tool, [at_query, after_tool]) == [after_tool]
        next_query = entry(tokens(1, 50), A, SNAPSHOT, after_user=True)
        assert set(map(id, superseded(next_query, [at_query, later_tool]))) == {id(at_query), id(later_tool)}


class TestEviction:
    def test_side_requests_go_before_the_sessions_conversation(self) -> None:
        """A title or summary request in the same session is evicted first, even when it is the newest."""
        main = entry(tokens(1, 2000), A, turn=3, age=30)
        title = entry(tokens(9000, 50), A)
        assert order_of([main, title], {A: time.monotonic()}) == [title, main]

    def test_idle_sessions_and_anonymous_requests_go_before_active_sessions(self) -> None:
        now = time.monotonic()
        active = entry(tokens(1, 100), ACTIVE, turn=2, age=100)
        idle = entry(tokens(2000, 100), IDLE, turn=5)
        anonymous = entry(tokens(4000, 100), None)
        lanes = {ACTIVE: now, IDLE: now - LANE_IDLE_SECONDS - 1}
        assert order_of([active, idle, anonymous], lanes) == [idle, anonymous, active]

    def test_a_session_over_its_fair_share_goes_first(self) -> None:
        now = time.monotonic()
        greedy = [entry(tokens(index * 1000, 10), GREEDY, SNAPSHOT, age=index) for index in range(3)]
        modest = entry(tokens(9000, 10), MODEST, turn=1, age=999)
        order = order_of([modest, *greedy], {GREEDY: now, MODEST: now}, max_bytes=3000)
        assert order[-1] is modest

    def test_a_large_session_is_not_over_its_share_while_every_session_fits(self) -> None:
        """A long main conversation beside small subagents keeps its place: least recently used goes first."""
        now = time.monotonic()
        main = entry(tokens(1, 10), MAIN, turn=5, age=999)
        main.nbytes = 4000
        subagents = [entry(tokens(1000 * index, 10), subagent_lane(index), turn=1) for index in range(1, 4)]
        lanes = {lane: now for lane in (MAIN, subagent_lane(1), subagent_lane(2), subagent_lane(3))}
        order = order_of([main, *subagents], lanes, max_bytes=8000)
        assert order[0] is main

    def test_a_checkpoint_a_longer_entry_holds_goes_first(self) -> None:
        """Any prefix of a trimmable conversation can be copied, so its system prompt's checkpoint adds nothing."""
        now = time.monotonic()
        checkpoint = entry(tokens(1, 20), None, CHECKPOINT)
        checkpoint.hits = 3
        conversation = entry(tokens(1, 40), A, turn=2, age=999)
        anonymous = entry(tokens(500, 20), None, age=999)
        assert order_of([conversation, anonymous, checkpoint], {A: now})[0] is checkpoint
        untrimmable = order_of([conversation, anonymous, checkpoint], {A: now}, trimmable=False)
        assert untrimmable[-1] is checkpoint, "a cache that cannot step back needs the checkpoint itself"

    def test_a_checkpoint_no_second_request_used_goes_with_anonymous_entries(self) -> None:
        now = time.monotonic()
        shared = entry(tokens(1, 20), None, CHECKPOINT, age=999)
        shared.hits = 2
        one_off = entry(tokens(500, 20), None, CHECKPOINT)
        conversation = entry(tokens(900, 40), A, turn=2, age=999)
        assert order_of([shared, conversation, one_off], {A: now}) == [one_off, shared, conversation]

    def test_under_pressure_the_cache_keeps_the_main_conversation(self) -> None:
        """Through the cache itself: one session's side requests fill it; its conversation stays."""
        cache = hybrid_prompt_cache(max_entries=3)
        conversation = tokens(1, 40)
        cache.release(hybrid_state(conversation), conversation, 40, A, turn=2)
        for base in (1000, 2000, 3000, 4000):
            cache.release(hybrid_state(tokens(base)), tokens(base), 20, A)
        assert cache.acquire([*conversation, 1], A).cached_tokens == 40
        decisions = describe_lanes(cache)["recent_decisions"]
        assert any(decision["decision"] == "evicted: a side request of its session" for decision in decisions)


class TestFairShare:
    def test_everything_fits(self) -> None:
        assert fair_share([100, 200, 300], 600) == float("inf")

    def test_what_small_sessions_leave_goes_to_the_large_ones(self) -> None:
        assert fair_share([100, 1000, 1000], 1000) == 450
        assert fair_share([], 1000) == float("inf")


def dense_state(token_list: list[int]) -> list[Any]:
    """One full-attention layer (trimmable): 2 KiB up to 256 tokens, 4 KiB up to 512."""
    cache = [KVCache()]
    data = mx.array(token_list, dtype=mx.float32).reshape(1, 1, len(token_list), 1)
    cache[0].update_and_fetch(data, data)
    mx.eval(cache[0].state)
    return cache


class TestAnAgentSession:
    def test_a_long_main_conversation_and_its_subagents_all_stay_when_they_fit(self) -> None:
        """The session of bench-sessions in small: each request's system prompt became a checkpoint too.

        Main (4 KiB) and three subagents (2 KiB each) fit the 10.5 KiB bound, but not
        with the checkpoints of their system prompts (320 bytes each): those go, since
        each conversation holds its own, and every conversation stays.
        """
        cache = KVPromptCache(lambda: [KVCache()], "unit-dense", 32, 10752)
        conversations = {MAIN: tokens(1, 300)}
        conversations.update({subagent_lane(index): tokens(1000 * index, 200) for index in range(1, 4)})
        for lane, conversation in conversations.items():
            cache.add_checkpoint(dense_state(conversation[:40]), conversation[:40])
            turn = 5 if lane == MAIN else 1
            cache.release(dense_state(conversation), conversation, len(conversation), lane, turn)
        for lane, conversation in conversations.items():
            lease = cache.acquire([*conversation, 7], lane)
            assert (lease.source, lease.cached_tokens) == ("extended", len(conversation)), lane
        decisions = [decision["decision"] for decision in describe_lanes(cache)["recent_decisions"]]
        assert decisions.count("evicted: a checkpoint that a longer entry holds") == 3

    def test_a_side_request_stored_into_a_full_cache_goes_itself(self) -> None:
        """Not the session's conversation, even though the conversation is the least recently used."""
        cache = KVPromptCache(lambda: [KVCache()], "unit-dense", 32, 5 * 1024)
        main, side = tokens(1, 300), tokens(5000, 200)
        cache.release(dense_state(main), main, len(main), SESSION, turn=3)
        cache.release(dense_state(side), side, len(side), SESSION)
        assert cache.acquire([*main, 7], SESSION).source == "extended"
        decisions = [decision["decision"] for decision in describe_lanes(cache)["recent_decisions"]]
        assert decisions[-1] == "evicted: a side request of its session"

    def test_subagents_go_before_their_sessions_main_conversation(self) -> None:
        """The session's share counts its subagents with it; a finished subagent goes, the main conversation stays."""
        cache = KVPromptCache(lambda: [KVCache()], "unit-dense", 32, 9 * 1024)
        main = tokens(1, 300)
        for _ in range(3):  # the session's earlier turns: it has come back
            cache.acquire([0, 1], Lane("claude-code", "s"))
        cache.release(dense_state(main), main, len(main), Lane("claude-code", "s"), turn=3)
        for agent in range(1, 4):
            conversation = tokens(1000 * agent, 200)
            cache.release(dense_state(conversation), conversation, 200, Lane("claude-code", "s", f"a{agent}"), turn=1)
        assert cache.acquire([*main, 7], Lane("claude-code", "s")).source == "extended"
        evicted = [d for d in describe_lanes(cache)["recent_decisions"] if d["decision"].startswith("evicted")]
        assert [d["lane"] for d in evicted] == ["claude-code:s/a1"]  # the least recently used subagent, only

    def test_a_request_that_named_no_session_keeps_what_it_computed_for_its_retry(self) -> None:
        """The newest entry stays while older ones make room (a cancelled prefill resent finds it)."""
        cache = KVPromptCache(lambda: [KVCache()], "unit-dense", 32, 5 * 1024)
        main, cancelled = tokens(1, 300), tokens(5000, 200)
        cache.release(dense_state(main), main, len(main), SESSION, turn=3)
        cache.release(dense_state(cancelled), cancelled, len(cancelled))
        lease = cache.acquire([*cancelled, 7])
        assert (lease.source, lease.cached_tokens) == ("extended", len(cancelled))


class TestReturningSessions:
    def test_a_session_seen_once_goes_before_one_that_came_back(self) -> None:
        """The one-off session is the most recent, yet the returning session's conversation stays."""
        now = time.monotonic()
        returning = entry(tokens(1, 20), A, turn=3, age=500)
        one_off = entry(tokens(100, 20), B)
        activity = {A: LaneActivity(now, requests=4), B: LaneActivity(now, requests=1)}
        assert EvictionPolicy([returning, one_off], activity, now, 10**9).order() == [one_off, returning]

    def test_among_sessions_seen_once_the_newest_goes_first(self) -> None:
        """First come, first served: a stream of one-off sessions cannot push out an earlier session's first turn."""
        now = time.monotonic()
        first, second, third = (entry(tokens(100 * n, 20), Lane("test", f"s{n}"), age=10 - n) for n in (1, 2, 3))
        activity = {entry_.lane: LaneActivity(now, 1) for entry_ in (first, second, third) if entry_.lane}
        assert EvictionPolicy([first, second, third], activity, now, 10**9).order() == [third, second, first]

    def test_a_conversations_first_turn_survives_one_off_sessions_until_it_returns(self) -> None:
        """bench-sessions' returning case in small: one-off sessions between two turns of a conversation."""
        cache = KVPromptCache(lambda: [KVCache()], "unit-dense", 32, 10 * 1024)  # two 300-token entries and a bit
        main = tokens(1, 300)
        cache.acquire([*main, 1], MAIN)
        cache.release(dense_state(main), main, len(main), MAIN)
        for number in range(3):
            one_off, lane = tokens(1000 * (number + 1), 300), Lane("test", f"one-off {number}")
            cache.acquire([*one_off, 1], lane)
            cache.release(dense_state(one_off), one_off, len(one_off), lane)
        lease = cache.acquire([*main, 7], MAIN)
        assert (lease.source, lease.cached_tokens) == ("extended", len(main))
        evicted = [d for d in describe_lanes(cache)["recent_decisions"] if d["decision"].startswith("evicted")]
        assert evicted and all(d["decision"] == "evicted: its session has not come back, newest first" for d in evicted)

    def test_the_cache_report_says_how_often_each_session_came_back(self) -> None:
        cache = KVPromptCache(lambda: [KVCache()], "unit-dense", 32, 10 * 1024)
        for _ in range(3):
            cache.acquire([0, 1], MAIN)
        cache.acquire([0, 1], Lane("test", "main", "agent"))
        lanes = describe_lanes(cache)["lanes"]
        assert lanes["test:main"]["requests"] == 3 and lanes["test:main"]["session_returns"] == 3
        assert lanes["test:main/agent"]["requests"] == 1


class TestSubagentLanes:
    def test_a_subagents_entries_go_before_any_sessions_main_conversation(self) -> None:
        now = time.monotonic()
        main = entry(tokens(1, 20), Lane("claude-code", "s"), turn=4, age=999)
        other_session = entry(tokens(100, 20), Lane("claude-code", "t"), turn=2, age=500)
        subagent = entry(tokens(500, 20), Lane("claude-code", "s", "a1"), turn=1)
        lanes = {
            lane: now for lane in (Lane("claude-code", "s"), Lane("claude-code", "t"), Lane("claude-code", "s", "a1"))
        }
        assert order_of([main, other_session, subagent], lanes)[0] is subagent

    def test_a_session_and_its_subagents_share_one_fair_share(self) -> None:
        """Two sessions: the one whose subagents together pass the fair level goes first, subagents before it."""
        now = time.monotonic()
        busy = [entry(tokens(1000 * n, 20), Lane("claude-code", "busy", f"a{n}"), turn=1, age=n) for n in range(1, 4)]
        busy_main = entry(tokens(1, 20), Lane("claude-code", "busy"), turn=3, age=999)
        quiet = entry(tokens(9000, 20), Lane("claude-code", "quiet"), turn=3, age=999)
        lanes = {e.lane: now for e in [*busy, busy_main, quiet] if e.lane}
        order = order_of([quiet, busy_main, *busy], lanes, max_bytes=3000)
        assert order[-1] is quiet and order[-2] is busy_main
