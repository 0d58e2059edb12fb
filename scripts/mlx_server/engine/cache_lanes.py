"""Which entries a session keeps and which go first under pressure: the prompt cache's policy (pure functions).

Agents say which session a request belongs to (``vocabulary.GenerationRequest.lane``;
a subagent's lane names its session and the agent).  A
session's newest turn replaces its own older turns instead of adding to one
global LRU (``superseded``), and under memory pressure entries go in this
order (``EvictionPolicy``), least recently used first within a class:

0. entries of idle sessions (no request for ``LANE_IDLE_SECONDS``);
1. checkpoints another entry holds: a stable prefix that a conversation
   which starts with it can give a copy of (trimmable caches only);
2. a session's side entries: one-off conversations beside its main one
   (a title or summary request, a probe), so they never push it out;
3. entries of requests that named no session, and checkpoints no second
   request has used (a one-off request's system prompt);
4. entries of sessions seen once: a session that has come back (with its
   subagents, a second request) is worth more than one that has not, as
   ARC and 2Q keep a second list for what returns.  Among these the newest
   goes first: sessions on probation hold what they got first-come
   first-served, so a stream of one-off sessions cannot push out the
   first turn of a conversation before it has had the chance to return;
5. entries of a session (with its subagents) holding more than its fair
   share: the max-min fair level of the bound among the active sessions,
   so a session may use what smaller ones leave, and none is pushed out
   while all of them fit (its subagents' entries go before its own);
6. subagents' conversations: a subagent's task ends, its session goes on;
7. everything else: sessions' main conversations and snapshots, and
   checkpoints shared by several requests.

A newly stored entry is exempt while room is made for it (a retry finds
what its request computed), unless it is a side request or its session has
not come back yet (``may_displace``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from mlx_server.engine.cache_entries import CHECKPOINT, CONVERSATION, SNAPSHOT, CacheEntry
from mlx_server.vocabulary import Lane

__all__ = [
    "LANE_IDLE_SECONDS",
    "EvictionPolicy",
    "LaneActivity",
    "fair_share",
    "main_conversations",
    "session_requests",
    "superseded",
]

LANE_IDLE_SECONDS = 600.0
IDLE, HELD_ELSEWHERE, SIDE, UNCLAIMED, ONE_OFF, OVER_SHARE, SUBAGENT, KEPT = range(8)
REASONS = {
    IDLE: "its session has been idle",
    HELD_ELSEWHERE: "a checkpoint that a longer entry holds",
    SIDE: "a side request of its session",
    UNCLAIMED: "no session and no second request claimed it, least recently used",
    ONE_OFF: "its session has not come back, newest first",
    OVER_SHARE: "its session holds more than its fair share",
    SUBAGENT: "a subagent's conversation, least recently used",
    KEPT: "least recently used of what every session keeps",
}


@dataclass
class LaneActivity:
    """A lane's requests: when it last made one, and how many it has made."""

    seen: float
    requests: int = 0


def session_requests(activity: Mapping[Lane, LaneActivity]) -> dict[Lane, int]:
    """Each session's requests, its subagents' included (a session returns with its second request)."""
    counts: dict[Lane, int] = defaultdict(int)
    for lane, seen in activity.items():
        counts[lane.session_lane] += seen.requests
    return counts


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


def main_conversations(entries: Iterable[CacheEntry]) -> dict[Lane | None, CacheEntry]:
    """Each lane's main conversation: the one continued most often, then the longest."""
    mains: dict[Lane | None, CacheEntry] = {}
    for entry in entries:
        if entry.kind != CONVERSATION or entry.lane is None:
            continue
        current = mains.get(entry.lane)
        if current is None or (entry.turn, len(entry.tokens)) > (current.turn, len(current.tokens)):
            mains[entry.lane] = entry
    return mains


def _of_subagent(entry: CacheEntry) -> bool:
    return entry.lane is not None and entry.lane.is_subagent


def fair_share(lane_bytes: Iterable[int], max_bytes: int) -> float:
    """The max-min fair level: lanes under it keep all they hold, the others are cut to it (inf: all fit)."""
    sizes = sorted(lane_bytes)
    remaining = float(max_bytes)
    for index, size in enumerate(sizes):
        level = remaining / (len(sizes) - index)
        if size > level:
            return level
        remaining -= size
    return math.inf


@dataclass(frozen=True)
class EvictionPolicy:
    """The classes of the module's docstring for one moment's entries: their order, and why each goes.

    ``trimmable``: whether a cache can give a copy of any prefix of what it
    holds (full attention), which is what makes a checkpoint redundant.
    """

    entries: list[CacheEntry]
    lane_activity: Mapping[Lane, LaneActivity]
    now: float
    max_bytes: int
    trimmable: bool = True

    def order(self) -> list[CacheEntry]:
        """The entries in the order they should go (within a class, a session's subagents before its own, then
        the least recently used; sessions seen once, the newest)."""

        def key(entry: CacheEntry) -> tuple[int, bool, float]:
            rank = self._classes[id(entry)]
            return rank, not _of_subagent(entry), -entry.last_used if rank == ONE_OFF else entry.last_used

        return sorted(self.entries, key=key)

    def reason(self, entry: CacheEntry) -> str:
        """Why ``entry`` goes, in words for /v1/cache and the debug line."""
        return REASONS[self._classes[id(entry)]]

    def may_displace(self, entry: CacheEntry) -> bool:
        """Whether a newly stored ``entry`` may stay while older ones make room for it.

        All may but a side request, and an entry of a session that has not come back.
        """
        return self._classes[id(entry)] not in (SIDE, ONE_OFF)

    @cached_property
    def _classes(self) -> dict[int, int]:  # worked out once: reason() is asked for every victim
        active = {lane for lane, seen in self.lane_activity.items() if self.now - seen.seen < LANE_IDLE_SECONDS}
        requests = session_requests(self.lane_activity)
        session_bytes: dict[Lane, int] = defaultdict(int)
        for entry in self.entries:
            if entry.lane in active:
                session_bytes[entry.lane.session_lane] += entry.nbytes
        share = fair_share(session_bytes.values(), self.max_bytes)
        mains = main_conversations(self.entries)

        def rank(entry: CacheEntry) -> int:
            if entry.kind == CHECKPOINT:
                if self.trimmable and self._held_elsewhere(entry):
                    return HELD_ELSEWHERE
                return KEPT if entry.hits else UNCLAIMED
            if entry.lane is None:
                return UNCLAIMED
            if entry.lane not in active:
                return IDLE
            if entry.kind == CONVERSATION and mains.get(entry.lane) is not entry:
                return SIDE
            if requests[entry.lane.session_lane] < 2:
                return ONE_OFF
            if session_bytes[entry.lane.session_lane] > share:
                return OVER_SHARE
            if _of_subagent(entry):
                return SUBAGENT
            return KEPT

        return {id(entry): rank(entry) for entry in self.entries}

    def _held_elsewhere(self, checkpoint: CacheEntry) -> bool:
        return any(
            other is not checkpoint and len(other.tokens) > len(checkpoint.tokens)
            and _starts_with(other.tokens, checkpoint.tokens)
            for other in self.entries
        )  # fmt: skip
