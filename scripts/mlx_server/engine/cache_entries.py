"""What the prompt cache holds, and how a prompt finds the entry that saves it the most work (pure functions).

An entry is the KV state of a token sequence, of one of three kinds:

* ``checkpoint``: a stable prefix (system prompt and tools), shared by every
  conversation that starts with it; always copied, never handed out.
* ``conversation``: a request's KV state when it ended (prompt and reply),
  owned by its session's lane; the next turn usually extends it.
* ``snapshot``: the KV state at the end of a conversation's history, where
  the next turn's prompt still agrees with this one whatever the reply
  re-renders to.  Kept only for models whose cache cannot step back.

mlx-lm's ``KVCache`` can be trimmed to any shorter prefix, so a dense model
reuses an entry up to the token where a new prompt leaves it.  A sliding
window (``RotatingKVCache``, once it has wrapped) or a recurrent state
(``ArraysCache``) cannot step back: such an entry is reusable only by a
prompt that extends all of it, which is what snapshots are for.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache, can_trim_prompt_cache, trim_prompt_cache

from mlx_server.vocabulary import CacheLookup, CacheSource, Divergence, Lane

__all__ = [
    "CHECKPOINT",
    "CONVERSATION",
    "MIN_REUSED_TOKENS",
    "SNAPSHOT",
    "CacheEntry",
    "CacheLease",
    "EntryKind",
    "Reuse",
    "best_reuse",
    "can_step_back",
    "common_prefix",
    "copy_prefix",
    "divergence_between",
    "entry_key",
    "held_tokens",
    "kv_bytes",
    "token_digest",
]

EntryKind = Literal["checkpoint", "conversation", "snapshot"]
CHECKPOINT: EntryKind = "checkpoint"
CONVERSATION: EntryKind = "conversation"
SNAPSHOT: EntryKind = "snapshot"
#: A match shorter than this is not worth a copy; the request starts cold.
MIN_REUSED_TOKENS = 8


def token_digest(tokens: np.ndarray | list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def entry_key(kind: EntryKind, tokens: np.ndarray | list[int]) -> str:
    """How an entry is found: its kind and the digest of its tokens."""
    return f"{kind}:{token_digest(tokens)}"


def kv_bytes(cache: list[Any]) -> int:
    return sum(int(layer.nbytes) for layer in cache)


def held_tokens(cache: list[Any]) -> int | None:
    """How many tokens the cache holds, or None if its layers do not agree (or do not say)."""
    offsets = {getattr(layer, "offset", None) for layer in cache if hasattr(layer, "offset")}
    if len(offsets) != 1:
        return None
    held = offsets.pop()
    return int(held) if isinstance(held, int) else None


def can_step_back(cache: list[Any]) -> bool:
    """Whether any prefix of what such a cache will hold can be had by trimming it (full attention only).

    A sliding window can step back only until it wraps, a recurrent state never.
    """
    return can_trim_prompt_cache(cache) and not any(isinstance(layer, RotatingKVCache) for layer in cache)


def copy_prefix(cache: list[Any], length: int) -> list[Any]:
    """Fresh cache objects holding the first ``length`` tokens of ``cache``; the source is untouched.

    Layers that cannot be trimmed are copied whole (the caller asks for all of them).
    """
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
    held = held_tokens(duplicate)
    if held is not None and held > length and can_trim_prompt_cache(duplicate):
        trim_prompt_cache(duplicate, held - length)
    mx.eval([layer.state for layer in duplicate])
    return duplicate


@dataclass(eq=False)
class CacheEntry:
    """The KV state of ``tokens``, what kind of entry it is, and whose."""

    tokens: np.ndarray
    cache: list[Any]
    nbytes: int
    kind: EntryKind
    prompt_length: int  # tokens[:prompt_length] came from a prompt; the rest were generated
    lane: Lane | None = None
    turn: int = 0  # how many turns of its session's conversation came before (a one-off request has none)
    after_user: bool = False  # snapshots: taken at the end of a user's message
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    hits: int = 0
    trimmable: bool = field(init=False)
    key: str = field(init=False)  # the digest of the kind and tokens, computed once

    def __post_init__(self) -> None:
        self.trimmable = can_trim_prompt_cache(self.cache)
        self.key = entry_key(self.kind, self.tokens)

    @property
    def pinned(self) -> bool:
        return self.kind == CHECKPOINT

    def usable(self, common: int, request_length: int) -> int:
        """How many of a request's tokens this entry can stand for, given the prefix they share.

        At least one token is always left to compute.  An entry that cannot be
        trimmed stands for all of its tokens or none.
        """
        usable = min(common, request_length - 1)
        if not self.trimmable and usable < len(self.tokens):
            return 0
        return usable if usable >= MIN_REUSED_TOKENS else 0


def common_prefix(stored: np.ndarray, request: np.ndarray) -> int:
    length = min(len(stored), len(request))
    if length == 0:
        return 0
    mismatches = np.flatnonzero(stored[:length] != request[:length])
    return int(mismatches[0]) if len(mismatches) else length


@dataclass(frozen=True)
class Reuse:
    """The entry a request starts from and how many tokens it stands for; ``nearest`` shares the longest prefix."""

    entry: CacheEntry | None
    usable: int
    nearest: CacheEntry | None
    common: int  # the tokens ``nearest`` shares with the request


_PREFERENCE = {CONVERSATION: 0, SNAPSHOT: 1, CHECKPOINT: 2}


def best_reuse(entries: Iterable[CacheEntry], request: np.ndarray, lane: Lane | None) -> Reuse:
    """The entry that saves the request the most tokens (pure; ``entries`` most recent first).

    On a tie the request's own lane wins, then a conversation (it can be
    handed out uncopied) over a snapshot over a checkpoint, then recency.
    """
    best: CacheEntry | None = None
    best_key: tuple[int, int, int] = (0, 0, 0)
    nearest: CacheEntry | None = None
    nearest_common = 0
    for entry in entries:
        common = common_prefix(entry.tokens, request)
        if common > nearest_common:
            nearest, nearest_common = entry, common
        usable = entry.usable(common, len(request))
        if not usable:
            continue
        key = (usable, int(entry.lane == lane), -_PREFERENCE[entry.kind])
        if best is None or key > best_key:
            best, best_key = entry, key
    return Reuse(best, best_key[0], nearest, nearest_common)


#: How many tokens of the cached and the new prompt a divergence carries, to explain a miss.
DIVERGENCE_EXCERPT_TOKENS = 12


@dataclass
class CacheLease:
    """What a request got from the cache: the KV objects to extend and how many tokens they hold.

    ``divergence`` says where the request left the closest entry when it was
    not a plain extension of it (a miss, or a partial hit).  ``turn`` is the
    turn this request is in its session's conversation (0: a new one).
    """

    cache: list[Any]
    cached_tokens: int
    source: CacheSource
    divergence: Divergence | None = None
    turn: int = 0

    def lookup(self, lane: Lane | None = None) -> CacheLookup:
        return CacheLookup(self.cached_tokens, self.source, self.divergence, lane)


def divergence_between(nearest: np.ndarray, request: np.ndarray, at: int) -> Divergence:
    """Where a prompt left the nearest entry, with a few tokens of each from there (to explain a miss)."""
    end = at + DIVERGENCE_EXCERPT_TOKENS
    return Divergence(at, tuple(int(token) for token in nearest[at:end]), tuple(int(t) for t in request[at:end]))
