"""Which entries a session keeps and which go first under pressure: the prompt cache's policy (pure functions).

Agents say which session a request belongs to (``vocabulary.GenerationRequest.lane``).
A session's newest turn replaces its own older turns instead of adding to
one global LRU (``superseded``), and under memory pressure entries go in
this order (``eviction_order``), least recently used first within a class:

0. entries of idle sessions (no request for ``LANE_IDLE_SECONDS``);
1. a session's side entries: one-off conversations beside its main one
   (a title or summary request, a probe), so they never push it out;
2. entries of requests that named no session;
3. entries of a session holding more than its fair share of the bytes (the
   bound divided among the active sessions);
4. everything else: active sessions' conversations and snapshots, and
   checkpoints (the shared system prompts).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mlx_server.engine.cache_entries import CHECKPOINT, CONVERSATION, SNAPSHOT, CacheEntry

__all__ = ["LANE_IDLE_SECONDS", "eviction_order", "eviction_reason", "main_conversations", "superseded"]

LANE_IDLE_SECONDS = 600.0
IDLE, SIDE, NO_LANE, OVER_SHARE, KEPT = range(5)


def _starts_with(longer: np.ndarray, prefix: np.ndarray) -> bool:
    return len(prefix) <= len(longer) and bool(np.array_equal(longer[: len(prefix)], prefix))


def superseded(new: CacheEntry, entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    """The older entries of the same lane that a newly stored one makes redundant.

    A conversation replaces the lane's conversations whose prompt it
    continues (its older turns, whatever their replies re-rendered to); a
    snapshot replaces the lane's snapshots it extends, except that one taken
    at the end of a user's message stays until a newer one of that kind
    comes: templates that re-render the replies after the last user message
    (dropping their reasoning) still agree with the prompt up to it.
    """
    replaced = []
    for entry in entries:
        if entry is new or entry.lane != new.lane or entry.kind != new.kind or entry.kind == CHECKPOINT:
            continue
        if (new.kind == CONVERSATION and _starts_with(new.tokens, entry.tokens[: entry.prompt_length])) or (
            new.kind == SNAPSHOT
            and _starts_with(new.tokens, entry.tokens)
            and not (entry.after_user and not new.after_user)
        ):
            replaced.append(entry)
    return replaced


def main_conversations(entries: Iterable[CacheEntry]) -> dict[str | None, CacheEntry]:
    """Each lane's main conversation: the one continued most often, then the longest."""
    mains: dict[str | None, CacheEntry] = {}
    for entry in entries:
        if entry.kind != CONVERSATION or entry.lane is None:
            continue
        current = mains.get(entry.lane)
        if current is None or (entry.turn, len(entry.tokens)) > (current.turn, len(current.tokens)):
            mains[entry.lane] = entry
    return mains


def eviction_order(
    entries: list[CacheEntry], lane_activity: Mapping[str, float], now: float, max_bytes: int
) -> list[CacheEntry]:
    """Entries in the order they should go (see the module's docstring)."""
    active = {lane for lane, seen in lane_activity.items() if now - seen < LANE_IDLE_SECONDS}
    share = max_bytes / max(1, len(active))
    lane_bytes: dict[str | None, int] = defaultdict(int)
    for entry in entries:
        lane_bytes[entry.lane] += entry.nbytes
    mains = main_conversations(entries)

    def rank(entry: CacheEntry) -> tuple[int, float]:
        if entry.kind == CHECKPOINT:
            return KEPT, entry.last_used
        if entry.lane is None:
            return NO_LANE, entry.last_used
        if entry.lane not in active:
            return IDLE, entry.last_used
        if entry.kind == CONVERSATION and mains.get(entry.lane) is not entry:
            return SIDE, entry.last_used
        if lane_bytes[entry.lane] > share:
            return OVER_SHARE, entry.last_used
        return KEPT, entry.last_used

    return sorted(entries, key=rank)


def eviction_reason(
    entry: CacheEntry, lane_activity: Mapping[str, float], now: float, entries: list[CacheEntry]
) -> str:
    """Why ``entry`` was evicted, in words for /v1/cache and the debug line."""
    if entry.kind == CHECKPOINT:
        return "a checkpoint, least recently used"
    if entry.lane is None:
        return "a request that named no session, least recently used"
    seen: Any = lane_activity.get(entry.lane)
    if seen is None or now - seen >= LANE_IDLE_SECONDS:
        return "its session has been idle"
    if entry.kind == CONVERSATION and main_conversations(entries).get(entry.lane) is not entry:
        return "a side request of its session"
    return "its session's least recently used entry"
