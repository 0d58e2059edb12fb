"""Exact answers for deterministic requests, so a repeated request costs no generation at all.

Only requests whose output is fixed are cached: temperature 0 (greedy), or a
given seed.  The key is a SHA-256 of the model identity and the canonical
request (everything that shapes the output; not ``stream`` or the model name
that is merely echoed), so it is stable across processes, unlike Python's
salted ``hash()``.  Hits and misses are logged with utils_logging's cache
helpers.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_server.vocabulary import FinishReason
from utils_logging import log_cache_hit, log_cache_miss

__all__ = ["AnswerCache", "AnswerCacheStats", "CachedAnswer"]


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None
    stored_at: float = field(default_factory=time.time)


class AnswerCache:
    """An LRU of finished answers (``--response-cache-size``); ``max_entries=0`` turns it off."""

    def __init__(self, model_identity: str, max_entries: int) -> None:
        self._identity = model_identity
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key_for(self, shaping_fields: dict[str, Any]) -> str:
        canonical = json.dumps({"model": self._identity, **shaping_fields}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> CachedAnswer | None:
        if not self.max_entries:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if found is None:
            log_cache_miss("response", key, "not answered before")
        else:
            log_cache_hit(
                "response",
                key,
                {"age_seconds": round(time.time() - found.stored_at, 3), "tokens": found.completion_tokens},
            )
        return found

    def put(self, key: str, response: CachedAnswer) -> None:
        if not self.max_entries:
            return
        with self._lock:
            self._entries[key] = response
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def stats(self) -> AnswerCacheStats:
        with self._lock:
            return AnswerCacheStats(len(self._entries), self.max_entries, self.hits, self.misses)


@dataclass(frozen=True)
class AnswerCacheStats:
    entries: int
    max_entries: int
    hits: int
    misses: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
