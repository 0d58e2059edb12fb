"""Reuse the KV state of earlier prompts: a true LRU of token-prefix entries, bounded by count and bytes.

A coding agent resends a long system prompt (and tools) every turn, then a
conversation that only grows.  Each entry holds mlx-lm's per-layer KV cache for
a token sequence.  A request is matched against every entry by longest common
token prefix, so only the tokens after the match are computed.

How an entry is handed out and stored back, so that a hit never doubles memory:

* A conversation entry that the request extends (the usual next turn) is
  *removed* from the cache and handed to the request, which extends the very
  same arrays in place; afterwards it is stored back under the longer token
  sequence.  No copy is made.  This includes a next turn that matches only
  part of the entry's *generated* tokens (the client sent the answer back
  re-formatted): nobody else can use that tail, so it is trimmed away.
* A partial match (a retry, an edited message, a second conversation sharing
  the system prompt) copies only the shared prefix into fresh arrays and leaves
  the entry in place for its own conversation.  The copy is the KV the new
  request needs anyway.
* Checkpoints (the stable prefix: system prompt plus tools) are pinned: they
  are always copied, never handed out, so every new conversation starts warm.

Bounds (entry count and bytes) are enforced whenever an entry is stored, and
the recency of an entry is refreshed on every use.  Lookup is a pure function
(``longest_prefix``); checkpoints on disk are ``prompt_cache_files``'s job.
All methods are safe to call from any thread (one lock); the engine calls
acquire/release from its worker.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from mlx_server.engine.prompt_cache_files import CheckpointFiles
from mlx_server.vocabulary import CacheLookup, Divergence

__all__ = [
    "MIN_REUSED_TOKENS",
    "CacheEntry",
    "CacheLease",
    "KVPromptCache",
    "PromptCacheStats",
    "copy_prefix",
    "longest_prefix",
    "token_digest",
]

logger = logging.getLogger("mlx")

#: A match shorter than this is not worth a copy; the request starts cold.
MIN_REUSED_TOKENS = 8
#: How many tokens of the cached and the new prompt a divergence carries, to explain a miss.
DIVERGENCE_EXCERPT_TOKENS = 12


def token_digest(tokens: np.ndarray | list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def _nbytes(cache: list[Any]) -> int:
    return sum(int(layer.nbytes) for layer in cache)


def _offset(cache: list[Any]) -> int | None:
    """How many tokens the cache holds, or None if its type does not say."""
    offsets = {getattr(layer, "offset", None) for layer in cache}
    if len(offsets) != 1:
        return None
    held = offsets.pop()
    return int(held) if isinstance(held, int) else None


def copy_prefix(cache: list[Any], length: int) -> list[Any]:
    """Fresh cache objects holding the first ``length`` tokens of ``cache``; the source is untouched."""
    if all(type(layer) is KVCache for layer in cache):
        copied: list[Any] = []
        for layer in cache:
            fresh = KVCache()
            if layer.keys is not None and length > 0:
                fresh.keys = mx.contiguous(layer.keys[..., :length, :])
                fresh.values = mx.contiguous(layer.values[..., :length, :])
                fresh.offset = length
            copied.append(fresh)
        mx.eval([state for layer in copied for state in (layer.keys, layer.values) if state is not None])
        return copied
    duplicate = copy.deepcopy(cache)
    held = _offset(duplicate)
    if held is not None and held > length:
        trim_prompt_cache(duplicate, held - length)
    return duplicate


@dataclass(eq=False)
class CacheEntry:
    """The KV state of ``tokens``; ``pinned`` entries (checkpoints) are copied, never handed out."""

    tokens: np.ndarray
    cache: list[Any]
    nbytes: int
    pinned: bool
    prompt_length: int  # tokens[:prompt_length] came from a prompt; the rest were generated
    created: float = field(default_factory=time.monotonic)
    hits: int = 0
    key: str = field(init=False)  # the digest of the tokens, computed once

    def __post_init__(self) -> None:
        self.key = token_digest(self.tokens)


def _common_prefix(stored: np.ndarray, request: np.ndarray) -> int:
    length = min(len(stored), len(request))
    if length == 0:
        return 0
    mismatches = np.flatnonzero(stored[:length] != request[:length])
    return int(mismatches[0]) if len(mismatches) else length


def _is_prefix(shorter: np.ndarray, longer: np.ndarray) -> bool:
    return bool(np.array_equal(shorter, longer[: len(shorter)]))


def longest_prefix(entries: Iterable[CacheEntry], request: np.ndarray) -> tuple[CacheEntry | None, int]:
    """The entry that shares the longest token prefix with ``request``, and that length.

    ``entries`` come most recent first; on a tie the earlier one wins, and a
    conversation entry beats a checkpoint (it can be handed out uncopied).
    """
    best: CacheEntry | None = None
    best_length = 0
    for entry in entries:
        length = _common_prefix(entry.tokens, request)
        if length > best_length or (length == best_length and best is not None and best.pinned and not entry.pinned):
            best, best_length = entry, length
    return best, best_length


@dataclass
class CacheLease:
    """What a request got from the cache: the KV objects to extend and how many tokens they hold.

    ``divergence`` says where the request left the closest entry when it was
    not a plain extension of it (a miss, or a partial hit): what explains the
    miss.  ``nothing_shared``: no entry shared even one token with it.
    """

    cache: list[Any]
    cached_tokens: int
    source: str  # "miss", "extended", "copied-prefix", "checkpoint", "snapshot", "off"
    divergence: Divergence | None = None

    def lookup(self, lane: str | None = None) -> CacheLookup:
        return CacheLookup(self.cached_tokens, self.source, self.divergence, lane)


def _divergence(nearest: np.ndarray, request: np.ndarray, at: int) -> Divergence:
    end = at + DIVERGENCE_EXCERPT_TOKENS
    return Divergence(at, tuple(int(token) for token in nearest[at:end]), tuple(int(t) for t in request[at:end]))


@dataclass(frozen=True)
class PromptCacheStats:
    enabled: bool
    entries: int
    checkpoints: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    tokens_saved: int
    evictions: int
    persisted_to: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVPromptCache:
    """The LRU of KV entries; ``max_entries=0`` turns reuse off.

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
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # oldest first
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

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def new_cache(self) -> list[Any]:
        return self._make_cache()

    # -- lookup ---------------------------------------------------------------

    def acquire(self, tokens: list[int], lane: str | None = None) -> CacheLease:
        """KV state for the longest cached prefix of ``tokens``; at least one token is left to compute.

        The choice is made under the lock; a copy (MLX work) is made after it,
        so /health and /metrics never wait for one.
        """
        if not self.enabled:
            return CacheLease(self.new_cache(), 0, "off")
        request = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            best, length = longest_prefix(reversed(self._entries.values()), request)
            usable = min(length, len(request) - 1)
            divergence = None if best is None or length == 0 else _divergence(best.tokens, request, length)
            whole = best is not None and usable == len(best.tokens)
            if best is None or usable < MIN_REUSED_TOKENS or (not whole and not can_trim_prompt_cache(best.cache)):
                self.misses += 1
                return CacheLease(self.new_cache(), 0, "miss", divergence)
            best.hits += 1
            self.hits += 1
            self.tokens_saved += usable
            if not best.pinned and (whole or usable >= best.prompt_length):
                del self._entries[best.key]  # handed out: the request owns these arrays now
                self._bytes -= best.nbytes
                if not whole:
                    trim_prompt_cache(best.cache, len(best.tokens) - usable)  # an unused generated tail
                return CacheLease(best.cache, usable, "extended")
            self._entries.move_to_end(best.key)
            source = "checkpoint" if best.pinned else "copied-prefix"
            shared = best.cache
            if length >= len(best.tokens):
                divergence = None  # the request went past the entry's end: nothing to explain
        return CacheLease(copy_prefix(shared, usable), usable, source, divergence)

    # -- storing --------------------------------------------------------------

    def release(self, cache: list[Any], tokens: list[int], prompt_length: int, lane: str | None = None) -> None:
        """Store a request's KV state back under the tokens it holds (never raises on odd state).

        ``tokens`` is the prompt followed by what was generated; ``prompt_length`` says where one ends.
        """
        if not self.enabled:
            return
        held = _offset(cache)
        if held is None or held == 0 or held > len(tokens):
            return
        kept = np.asarray(tokens[:held], dtype=np.int64)
        self._store(CacheEntry(kept, cache, _nbytes(cache), pinned=False, prompt_length=min(prompt_length, held)))

    def add_checkpoint(self, cache: list[Any], tokens: list[int], copy: bool = True) -> bool:
        """Pin ``cache`` (which holds exactly ``tokens``) as a checkpoint, and save it; False if it exists.

        ``copy=False`` takes ownership of ``cache`` instead of copying it (a snapshot made for this purpose).
        """
        if not self.enabled or len(tokens) < MIN_REUSED_TOKENS:
            return False
        key = token_digest(tokens)
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and existing.pinned:
                self._entries.move_to_end(key)
                return False
        snapshot = copy_prefix(cache, len(tokens)) if copy else cache
        entry = CacheEntry(
            np.asarray(tokens, dtype=np.int64), snapshot, _nbytes(snapshot), pinned=True, prompt_length=len(tokens)
        )
        self._store(entry)
        if self._files is not None:
            self._files.save(entry.key, entry.tokens, entry.cache)
        return True

    def has_checkpoint(self, tokens: list[int]) -> bool:
        with self._lock:
            entry = self._entries.get(token_digest(tokens))
            return entry is not None and entry.pinned

    def trim_to(self, max_bytes: int) -> None:
        """Evict least recently used entries until at most ``max_bytes`` are held (room for active sequences)."""
        with self._lock:
            while self._entries and self._bytes > max(0, max_bytes):
                evicted = self._entries.pop(next(iter(self._entries)))
                self._bytes -= evicted.nbytes
                self.evictions += 1

    def _store(self, entry: CacheEntry) -> None:
        if entry.nbytes > self.max_bytes:
            logger.info(
                "Prompt cache: an entry of %d bytes exceeds the %d-byte bound; not kept", entry.nbytes, self.max_bytes
            )
            return
        with self._lock:
            previous = self._entries.pop(entry.key, None)
            if previous is not None:
                self._bytes -= previous.nbytes
                entry.pinned = entry.pinned or previous.pinned
            if not entry.pinned:
                # Conversation entries that are prefixes of this one are now redundant.
                for other_key, other in list(self._entries.items()):
                    if (
                        not other.pinned
                        and len(other.tokens) < len(entry.tokens)
                        and _is_prefix(other.tokens, entry.tokens)
                    ):
                        del self._entries[other_key]
                        self._bytes -= other.nbytes
            self._entries[entry.key] = entry
            self._bytes += entry.nbytes
            self._evict_to_bounds(keep=entry.key)

    def _evict_to_bounds(self, keep: str) -> None:
        """Drop least recently used entries until both bounds hold (caller holds the lock)."""
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            oldest_key = next(iter(self._entries))
            if oldest_key == keep and len(self._entries) == 1:
                break
            if oldest_key == keep:
                self._entries.move_to_end(keep)
                continue
            evicted = self._entries.pop(oldest_key)
            self._bytes -= evicted.nbytes
            self.evictions += 1

    # -- persistence ------------------------------------------------------------

    def save_checkpoints(self) -> int:
        """Save every checkpoint (at shutdown; conversation entries are not kept); returns how many."""
        if self._files is None:
            return 0
        with self._lock:
            checkpoints = [entry for entry in self._entries.values() if entry.pinned]
        for entry in checkpoints:
            self._files.save(entry.key, entry.tokens, entry.cache)
        return len(checkpoints)

    def _load_checkpoints(self, files: CheckpointFiles) -> None:
        loaded = 0
        for tokens, cache in files.load(token_digest):
            kept = np.asarray(tokens, dtype=np.int64)
            self._store(CacheEntry(kept, cache, _nbytes(cache), pinned=True, prompt_length=len(tokens)))
            loaded += 1
        if loaded:
            logger.info("Prompt cache: loaded %d saved checkpoints from %s", loaded, files.directory)

    # -- visibility -----------------------------------------------------------

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(
                enabled=self.enabled,
                entries=len(self._entries),
                checkpoints=sum(entry.pinned for entry in self._entries.values()),
                bytes=self._bytes,
                max_entries=self.max_entries,
                max_bytes=self.max_bytes,
                hits=self.hits,
                misses=self.misses,
                tokens_saved=self.tokens_saved,
                evictions=self.evictions,
                persisted_to=str(self._files.directory) if self._files else None,
            )

    def describe_entries(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "key": entry.key[:12],
                    "tokens": len(entry.tokens),
                    "bytes": entry.nbytes,
                    "pinned": entry.pinned,
                    "hits": entry.hits,
                    "age_seconds": round(now - entry.created, 1),
                }
                for entry in reversed(self._entries.values())
            ]
