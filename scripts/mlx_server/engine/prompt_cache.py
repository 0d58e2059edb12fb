"""Reuse the KV state of earlier prompts, per session, bounded by count and bytes.

A coding agent resends a long system prompt (and tools) every turn, then a
conversation that only grows.  Each entry (``cache_entries``) holds
mlx-lm's per-layer KV cache for a token sequence; a request starts from the
entry that stands for most of its prompt, so only the rest is computed.

How an entry is handed out and stored back, so that a hit never doubles memory:

* A conversation of the request's own session that it extends (the usual
  next turn) is *removed* from the cache and handed to the request, which
  extends the very same arrays in place; afterwards it is stored back under
  the longer token sequence.  A next turn that matches only part of the
  entry's generated tokens (the client sent the reply back re-formatted)
  gets it trimmed, when the cache can step back.
* Anything else (another session's conversation, a snapshot, a checkpoint)
  is copied: only the shared prefix, which is the KV the request needs anyway.
* Models whose cache cannot step back (sliding windows, recurrent layers)
  also keep snapshots at the end of each turn's history (``add_snapshot``),
  so the next turn resumes exactly there, whatever the reply re-renders to.

Where a request's prefill pauses to keep KV state, and what that state
becomes, is decided here too (``pause_points``, ``keep_paused``): a checkpoint
at the stable prefix, a snapshot at the end of the history.  Sessions (lanes)
and what goes first under pressure are ``cache_lanes``'s policy; checkpoints
on disk are ``prompt_cache_files``'s job; the reports /v1/cache shows are
``cache_report``'s.  Decisions are made under one lock; copies (MLX work) are
made after it, so /health and /metrics never wait for one.  The engine calls
everything from its worker, and the cache reads the engine's clock (the step
plan's, the same on every rank of a distributed model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlx_server.engine.cache_entries import (
    CHECKPOINT,
    CONVERSATION,
    MIN_REUSED_TOKENS,
    SNAPSHOT,
    CacheEntry,
    CacheLease,
    best_reuse,
    can_step_back,
    copy_prefix,
    divergence_between,
    entry_key,
    held_tokens,
    kv_bytes,
    token_digest,
)
from mlx_server.engine.cache_lanes import LANE_IDLE_SECONDS, EvictionPolicy, LaneActivity, superseded
from mlx_server.engine.prompt_cache_files import CheckpointFiles
from mlx_server.vocabulary import CacheSource, GenerationRequest, Lane, PromptCacheStats
from utils_logging import debug

__all__ = ["MIN_REUSED_TOKENS", "CacheLease", "KVPromptCache"]  # CacheLease: cache_entries's, re-exported

logger = logging.getLogger("mlx")

#: Decisions (stored, replaced, evicted) that /v1/cache shows.
RECENT_DECISIONS = 16
#: Sessions whose activity is remembered; beyond it the longest idle is forgotten (clients choose session ids).
MAX_LANES = 4096


class KVPromptCache:
    """The entries, the sessions' activity, and the bounds; ``max_entries=0`` turns reuse off.

    ``make_cache`` returns an empty KV cache for the model (``for_model`` uses mlx-lm's ``make_prompt_cache``).
    """

    def __init__(
        self,
        make_cache: Callable[[], list[Any]],
        model_identity: str,
        max_entries: int,
        max_bytes: int,
        directory: Path | None = None,
    ) -> None:
        self._make_cache = make_cache
        self._clock: Callable[[], float] = time.monotonic
        self._measure: Callable[[list[Any]], int] = kv_bytes
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.trimmable = can_step_back(make_cache())
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self._lanes: dict[Lane, LaneActivity] = {}  # lane -> when it last made a request, and how many
        self._decisions: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self.evictions = 0
        self._files = CheckpointFiles(directory, model_identity, max_entries, max_bytes) if directory else None
        if self._files is not None and self.enabled:
            self._load_checkpoints(self._files)

    @classmethod
    def for_model(
        cls, model: Any, model_identity: str, max_entries: int, max_bytes: int, directory: Path | None = None
    ) -> KVPromptCache:
        return cls(lambda: make_prompt_cache(model), model_identity, max_entries, max_bytes, directory)

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Read time from ``clock`` (the engine's step plans': rank 0's on every rank of a distributed model)."""
        self._clock = clock

    def count_in_tokens(self, bytes_per_token: int) -> None:
        """Measure entries by the tokens they hold (at ``bytes_per_token``) rather than by their arrays' bytes.

        The ranks of a distributed model must evict alike, and a pipeline rank
        holds only its own layers' KV state: measured in bytes, the ranks would
        part.
        """
        self._measure = lambda cache: (held_tokens(cache) or 0) * bytes_per_token

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    @property
    def needs_snapshots(self) -> bool:
        """Whether this model's cache cannot step back, so turns resume from snapshots."""
        return self.enabled and not self.trimmable

    @property
    def nbytes(self) -> int:
        return self._bytes

    def new_cache(self) -> list[Any]:
        return self._make_cache()

    # -- lookup ---------------------------------------------------------------

    def acquire(self, tokens: list[int], lane: Lane | None = None) -> CacheLease:
        """KV state for as much of ``tokens`` as the cache holds; at least one token is left to compute."""
        if not self.enabled:
            return CacheLease(self.new_cache(), 0, "off")
        request = np.asarray(tokens, dtype=np.int64)
        now = self._clock()
        with self._lock:
            if lane is not None:
                activity = self._lanes.setdefault(lane, LaneActivity(now))
                activity.seen = now
                activity.requests += 1
                if len(self._lanes) > MAX_LANES:
                    self._forget_idlest_lanes()
            reuse = best_reuse(reversed(self._entries.values()), request, lane)
            nearest = reuse.nearest
            divergence = None
            if nearest is not None and reuse.common < len(nearest.tokens):  # the prompt left it before its end
                divergence = divergence_between(nearest.tokens, request, reuse.common)
            best = reuse.entry
            if best is None:
                self.misses += 1
                return CacheLease(self.new_cache(), 0, "miss", divergence)
            usable = reuse.usable
            best.hits += 1
            best.last_used = now
            self.hits += 1
            self.tokens_saved += usable
            turn = best.turn + 1 if best.kind != CHECKPOINT and best.lane == lane else 0
            whole = usable == len(best.tokens)
            if best.kind == CONVERSATION and best.lane == lane and (whole or usable >= best.prompt_length):
                self._remove(best)  # handed out: the request owns these arrays now
                if not whole:
                    trim_prompt_cache(best.cache, len(best.tokens) - usable)  # an unused generated tail
                return CacheLease(best.cache, usable, "extended", None if whole else divergence, turn)
            self._entries.move_to_end(best.key)
            source: CacheSource = (
                "checkpoint" if best.kind == CHECKPOINT else "snapshot" if best.kind == SNAPSHOT else "copied-prefix"
            )
            shared = best.cache
        return CacheLease(copy_prefix(shared, usable), usable, source, divergence, turn)

    # -- keeping KV state on the way -----------------------------------------------

    def pause_points(self, lease: CacheLease, prompt: list[int], request: GenerationRequest) -> list[int]:
        """Where a prefill from ``lease`` pauses to keep KV state: the stable prefix, and the end of the history.

        ``prompt`` is the request's prompt as the cache keys it.  The stable
        prefix (system prompt and tools) becomes a checkpoint every
        conversation shares; a lease that already covers it is copied at once.
        For a cache that cannot step back, the end of the history becomes the
        snapshot the next turn resumes from.
        """
        if not self.enabled:
            return []
        points = []
        prefix = request.stable_prefix
        if prefix >= MIN_REUSED_TOKENS and not self.has_checkpoint(prompt[:prefix]):
            if lease.cached_tokens < prefix:
                points.append(prefix)
            elif lease.cached_tokens == prefix or self.trimmable:
                self.add_checkpoint(lease.cache, prompt[:prefix])
        end = request.turn_start
        if (
            self.needs_snapshots
            and lease.cached_tokens < end < len(prompt)
            and end >= MIN_REUSED_TOKENS
            and not self.has_snapshot(prompt[:end])
        ):
            points.append(end)
        return sorted(set(points))

    def keep_paused(self, cache: list[Any], tokens: list[int], request: GenerationRequest, turn: int) -> None:
        """KV state taken at one of ``pause_points`` (the request's own copy, holding ``tokens``, keyed)."""
        if len(tokens) == request.turn_start and self.needs_snapshots:
            if len(tokens) == request.stable_prefix:
                self.add_checkpoint(cache, tokens)  # a copy: the snapshot keeps this one
            self.add_snapshot(cache, tokens, request.lane, request.after_user, turn)
        elif len(tokens) == request.stable_prefix:
            self.add_checkpoint(cache, tokens, copy=False)

    # -- storing --------------------------------------------------------------

    def release(
        self, cache: list[Any], tokens: list[int], prompt_length: int, lane: Lane | None = None, turn: int = 0
    ) -> None:
        """Store a request's KV state back under the tokens it holds (never raises on odd state).

        ``tokens`` is the prompt followed by what was generated; ``prompt_length`` says where one ends.
        """
        if not self.enabled:
            return
        held = held_tokens(cache)
        if held is None or held == 0 or held > len(tokens):
            return
        kept = np.asarray(tokens[:held], dtype=np.int64)
        entry = CacheEntry(kept, cache, self._measure(cache), CONVERSATION, min(prompt_length, held), lane, turn)
        self._store(entry)

    def add_snapshot(
        self, cache: list[Any], tokens: list[int], lane: Lane | None, after_user: bool, turn: int = 0
    ) -> None:
        """Keep ``cache`` (this request's own copy, holding exactly ``tokens``) as where its next turn resumes."""
        if not self.enabled or len(tokens) < MIN_REUSED_TOKENS:
            return
        kept = np.asarray(tokens, dtype=np.int64)
        entry = CacheEntry(kept, cache, self._measure(cache), SNAPSHOT, len(tokens), lane, turn, after_user)
        self._store(entry)

    def has_snapshot(self, tokens: list[int]) -> bool:
        with self._lock:
            return entry_key(SNAPSHOT, tokens) in self._entries

    def add_checkpoint(self, cache: list[Any], tokens: list[int], copy: bool = True) -> bool:
        """Pin ``cache`` (which holds exactly ``tokens``) as a checkpoint, and save it; False if it exists.

        ``copy=False`` takes ownership of ``cache`` instead of copying it (a snapshot made for this purpose).
        """
        if not self.enabled or len(tokens) < MIN_REUSED_TOKENS:
            return False
        digest = token_digest(tokens)
        with self._lock:
            existing = self._entries.get(entry_key(CHECKPOINT, tokens))
            if existing is not None:
                self._entries.move_to_end(existing.key)
                return False
        kept = copy_prefix(cache, len(tokens)) if copy else cache
        if held_tokens(kept) not in (None, len(tokens)):
            return False  # a cache that cannot step back holds more than the prefix: no checkpoint from it
        entry = CacheEntry(np.asarray(tokens, dtype=np.int64), kept, self._measure(kept), CHECKPOINT, len(tokens))
        self._store(entry)
        if self._files is not None:
            self._files.save(digest, entry.tokens, entry.cache)
        return True

    def has_checkpoint(self, tokens: list[int]) -> bool:
        with self._lock:
            return entry_key(CHECKPOINT, tokens) in self._entries

    def computes_prefix(self, prompt: list[int], stable_prefix: int) -> bool:
        """Whether a request with this prompt will prefill its stable prefix itself (no checkpoint holds it yet):
        others with the same prefix then wait for its checkpoint instead of computing it too."""
        return self.enabled and stable_prefix >= MIN_REUSED_TOKENS and not self.has_checkpoint(prompt[:stable_prefix])

    def trim_to(self, max_bytes: int) -> None:
        """Evict entries, in the policy's order, until at most ``max_bytes`` are held (room for the batch)."""
        with self._lock:
            self._evict(lambda: self._bytes > max(0, max_bytes))

    def _store(self, entry: CacheEntry) -> None:
        if entry.nbytes > self.max_bytes:
            logger.info(
                "Prompt cache: an entry of %d bytes exceeds the %d-byte bound; not kept", entry.nbytes, self.max_bytes
            )
            return
        with self._lock:
            previous = self._entries.get(entry.key)
            if previous is not None:
                self._remove(previous)
            replaced = superseded(entry, self._entries.values())
            for older in replaced:
                self._remove(older)
            entry.created = entry.last_used = self._clock()
            self._entries[entry.key] = entry
            self._bytes += entry.nbytes
            if entry.lane is not None:
                self._lanes.setdefault(entry.lane, LaneActivity(entry.last_used)).seen = entry.last_used
            if entry.kind != CHECKPOINT:
                self._decide(entry, "stored" + (f", replacing {len(replaced)} older" if replaced else ""))
            self._evict(lambda: len(self._entries) > self.max_entries or self._bytes > self.max_bytes, entry)

    def _remove(self, entry: CacheEntry) -> None:
        """Take ``entry`` out (caller holds the lock)."""
        del self._entries[entry.key]
        self._bytes -= entry.nbytes

    def _evict(self, over: Callable[[], bool], new: CacheEntry | None = None) -> None:
        """Evict in the policy's order while ``over()`` (caller holds the lock); ``new`` goes last if it may."""
        if not over():
            return
        now = self._clock()
        policy = EvictionPolicy(list(self._entries.values()), self._lanes, now, self.max_bytes, self.trimmable)
        victims = policy.order()
        if new is not None and policy.may_displace(new):
            victims = [*(entry for entry in victims if entry is not new), new]
        for victim in victims:
            if not over():
                break
            self._decide(victim, "evicted: " + policy.reason(victim))
            self._remove(victim)
            self.evictions += 1
        self._lanes = {lane: seen for lane, seen in self._lanes.items() if now - seen.seen < LANE_IDLE_SECONDS}

    def _forget_idlest_lanes(self) -> None:
        """Keep the newest ``MAX_LANES`` sessions' activity (caller holds the lock)."""
        newest = sorted(self._lanes.items(), key=lambda item: item[1].seen, reverse=True)[: MAX_LANES // 2]
        self._lanes = dict(newest)

    def _decide(self, entry: CacheEntry, decision: str) -> None:
        """Record a decision for /v1/cache and the debug log (caller holds the lock)."""
        lane = str(entry.lane) if entry.lane is not None else None
        record = {"decision": decision, "kind": entry.kind, "lane": lane, "tokens": len(entry.tokens)}
        self._decisions.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **record})
        debug(2, "Prompt cache", record)

    # -- persistence ------------------------------------------------------------

    def save_checkpoints(self) -> int:
        """Save every checkpoint (at shutdown; conversations and snapshots are not kept); returns how many."""
        if self._files is None:
            return 0
        with self._lock:
            checkpoints = [entry for entry in self._entries.values() if entry.kind == CHECKPOINT]
        for entry in checkpoints:
            self._files.save(token_digest(entry.tokens), entry.tokens, entry.cache)
        return len(checkpoints)

    def _load_checkpoints(self, files: CheckpointFiles) -> None:
        loaded = 0
        for tokens, cache in files.load(token_digest):
            kept = np.asarray(tokens, dtype=np.int64)
            self._store(CacheEntry(kept, cache, self._measure(cache), CHECKPOINT, len(tokens)))
            loaded += 1
        if loaded:
            logger.info("Prompt cache: loaded %d saved checkpoints from %s", loaded, files.directory)

    # -- visibility -----------------------------------------------------------

    def stats(self) -> PromptCacheStats:
        with self._lock:
            entries = list(self._entries.values())
            return PromptCacheStats(
                enabled=self.enabled,
                entries=len(entries),
                checkpoints=sum(entry.kind == CHECKPOINT for entry in entries),
                snapshots=sum(entry.kind == SNAPSHOT for entry in entries),
                lanes=len(self._lanes),
                bytes=self._bytes,
                max_entries=self.max_entries,
                max_bytes=self.max_bytes,
                hits=self.hits,
                misses=self.misses,
                tokens_saved=self.tokens_saved,
                evictions=self.evictions,
                persisted_to=str(self._files.directory) if self._files else None,
            )

    def entries(self) -> list[CacheEntry]:
        """The entries, least recently used first (their caches are the cache's own: read, never change)."""
        with self._lock:
            return list(self._entries.values())

    def activity(self) -> tuple[dict[Lane, LaneActivity], list[dict[str, Any]], float]:
        """Copies of the sessions' activity and the recent decisions, with the clock's now (for ``cache_report``)."""
        with self._lock:
            lanes = {lane: LaneActivity(seen.seen, seen.requests) for lane, seen in self._lanes.items()}
            return lanes, list(self._decisions), self._clock()
