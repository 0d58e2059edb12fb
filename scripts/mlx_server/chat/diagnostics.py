"""Why a prompt missed the cache, in words a person can act on: the message, its role, and what changed.

The engine reports where a prompt left the nearest cached entry as token
offsets (``vocabulary.Divergence``); only the chat core knows the messages
behind those tokens.  Working that out takes template renders and decoding,
so it is never done on the engine's worker and never under a lock: an
explanation is prepared as a closure and worked out once, when a debug line
is written, a client's response headers need the message, or ``/v1/cache`` is
read (which the edge does off the event loop).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlx_server.chat.prompts import ChatTemplate, TemplateOptions
from mlx_server.vocabulary import CacheLookup, Message, Tool
from utils_logging import is_debug_enabled, log_cache_hit, log_cache_miss, redact

__all__ = ["CacheDiagnostics", "MissExplanation"]

EXCERPT_CHARS = 80
RECENT_MISSES = 8  # misses (and partial hits) whose explanation /v1/cache keeps
EXPLAINED_SOURCES = frozenset({"miss", "copied-prefix", "checkpoint", "snapshot"})


@dataclass(frozen=True)
class MissExplanation:
    """Where a prompt left the cache: the token, the message (index into the request's messages) and its role."""

    reason: str
    diverged_at_token: int | None = None
    diverged_at_message: int | None = None
    role: str | None = None
    cached_text: str | None = None
    new_text: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.diverged_at_token is None:
            return {"reason": self.reason}
        return {
            "diverged_at_token": self.diverged_at_token,
            "diverged_at_message": self.diverged_at_message,
            "role": self.role,
            "cached_text": self.cached_text,
            "new_text": self.new_text,
            "reason": self.reason,
        }


class CacheDiagnostics:
    """Explains prompt-cache lookups; keeps the last few misses for ``/v1/cache`` (one lock, held briefly)."""

    def __init__(self, template: ChatTemplate) -> None:
        self._template = template
        self._recent: deque[tuple[str, dict[str, Any], Callable[[], MissExplanation]]] = deque(maxlen=RECENT_MISSES)
        self._lock = threading.Lock()

    def explainer(
        self,
        lookup: CacheLookup,
        messages: Sequence[Message],
        tools: Sequence[Tool],
        options: TemplateOptions = (),
    ) -> Callable[[], MissExplanation] | None:
        """A closure that explains a miss or partial hit (None for a plain hit, or the cache off); computed once."""
        if lookup.source not in EXPLAINED_SOURCES:
            return None
        divergence = lookup.divergence
        if divergence is None:
            if lookup.source != "miss":
                return None
            return lambda: MissExplanation("nothing cached shares a prefix with this prompt")
        template = self._template
        tokenizer = template.tokenizer

        @functools.cache
        def explain() -> MissExplanation:
            at = divergence.at_token
            where = template.message_at_token(messages, tools, at, options) if messages else None
            if where is not None and where[1] == "system":
                reason = f"the system prompt changed: it differs from the cached one at token {at}"
            elif where is not None:
                reason = f"{where[1]} message {where[0]} differs from the cached conversation at token {at}"
            else:
                reason = f"the prompt differs from the nearest cached one at token {at}"
            return MissExplanation(
                reason,
                at,
                where[0] if where else None,
                where[1] if where else None,
                _excerpt(tokenizer, divergence.cached),
                _excerpt(tokenizer, divergence.prompt),
            )

        return explain

    def record(self, lookup: CacheLookup, prompt: Sequence[int], explain: Callable[[], MissExplanation] | None) -> None:
        """Keep a miss for /v1/cache and, at ANYCLAUDE_DEBUG >= 1, log the lookup (explained when it missed)."""
        counts: dict[str, Any] = {
            "cached_tokens": lookup.cached_tokens,
            "new_tokens": len(prompt) - lookup.cached_tokens,
        }
        if lookup.lane is not None:
            counts["lane"] = str(lookup.lane)
        if explain is not None:
            with self._lock:
                self._recent.append((time.strftime("%Y-%m-%dT%H:%M:%S"), counts, explain))
        if not is_debug_enabled():
            return
        details = {**counts, **(explain().as_dict() if explain is not None else {})}
        key = hashlib.sha256(str(list(prompt)).encode()).hexdigest()[:16]
        if lookup.cached_tokens:
            log_cache_hit("prompt", key, {**details, "source": lookup.source})
        else:
            log_cache_miss("prompt", key, str(details.get("reason", "no cached prefix")), details)

    def recent_misses(self) -> list[dict[str, Any]]:
        """The last misses explained, oldest first (renders templates: call it off the event loop)."""
        with self._lock:
            misses = list(self._recent)
        return [{"at": at, **counts, **explain().as_dict()} for at, counts, explain in misses]


def _excerpt(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The tokens as text; an image's tokens (the prompt cache keys them by negative ids) read as ``[image]``."""
    pieces: list[str] = []
    run: list[int] = []
    for index, token in enumerate(tokens):
        if token >= 0:
            run.append(token)
        elif index == 0 or tokens[index - 1] != token:
            pieces += [str(tokenizer.decode(run)) if run else "", "[image]"]
            run = []
    text = "".join([*pieces, str(tokenizer.decode(run)) if run else ""])
    scrubbed = redact(text)
    text = scrubbed if isinstance(scrubbed, str) else text
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
