"""What a generation request is to the engine, what it gets back, and the steps every decoder shares.

A ``Job`` is one request on the worker thread: its prompt, sampling
settings, cancellation and deadline, and how to deliver ``TokenEvent``s back
to the request's event loop.  ``Sequence`` follows a job from its prompt-cache
lease to its last event: the lookup, the checkpoint at the stable prefix,
detokenizing, stop text, stats, and storing the KV state back.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine

from mlx_server.prompt_cache import MIN_REUSED_TOKENS, CacheLease, KVPromptCache, token_digest
from utils_logging import is_debug_enabled, log_cache_hit, log_cache_miss, redact

__all__ = ["GenerationStats", "Job", "SamplingSettings", "Sequence", "StopText", "TokenEvent"]

logger = logging.getLogger("mlx")

EXCERPT_TOKENS = 12  # how much of the cached and the new text a miss explanation shows
EXCERPT_CHARS = 80


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one completion (already validated and defaulted)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # an llguidance grammar the output must follow (None: free)


@dataclass
class GenerationStats:
    """The numbers a user wants about one completion."""

    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    cache_source: str = "miss"
    finish_reason: str = "stop"
    stop_sequence: str | None = None  # the stop sequence that ended the completion, if one did
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    generation_ms: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token."""
        decode_seconds = (self.generation_ms - self.time_to_first_token_ms) / 1000
        return (
            (self.completion_tokens - 1) / decode_seconds if self.completion_tokens > 1 and decode_seconds > 0 else 0.0
        )


@dataclass
class TokenEvent:
    """A piece of generated text; the last event of a completion carries its stats."""

    text: str
    stats: GenerationStats | None = None
    error: BaseException | None = field(default=None, repr=False)

    @property
    def final(self) -> bool:
        return self.stats is not None or self.error is not None


@dataclass
class Job:
    """One request's work, as the worker thread sees it."""

    prompt: list[int]
    stable_prefix: int
    settings: SamplingSettings
    cancelled: threading.Event
    deliver: Callable[[TokenEvent], None]
    enqueued: float
    use_cache: bool = True
    deadline: float | None = None  # time.perf_counter() after which generation stops with "timeout"
    context: contextvars.Context | None = None  # the request's logging context (its request id)
    locate: Callable[[int], tuple[int, str] | None] | None = None  # token offset -> (message index, role)

    def in_context(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` so that its log lines carry this request's id."""
        return work() if self.context is None else self.context.run(work)

    @functools.cached_property
    def prefix_key(self) -> str | None:
        """The digest of the stable prefix (what a checkpoint would hold), or None when there is none worth one."""
        return token_digest(self.prompt[: self.stable_prefix]) if self.stable_prefix >= MIN_REUSED_TOKENS else None

    @property
    def final_length(self) -> int:
        """The most tokens this request's KV state can reach: its prompt and every token it may generate."""
        return len(self.prompt) + self.settings.max_tokens

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.perf_counter() > self.deadline)

    def stop_reason(self) -> str:
        return "cancelled" if self.cancelled.is_set() else "timeout"


class StopText:
    """Stop sequences over streamed text: what may be sent, and which sequence matched (mlx-lm's TextStateMachine).

    Text that could be the start of a stop sequence is held back; the
    sequence itself and anything after it are never sent.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._state = TextStateMachine({"normal": [(stop, None) for stop in stops]}).make_state()
        self._seen = ""
        self._sent = 0
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The text that is safe to send; sets ``matched`` when a stop sequence completes."""
        if self.matched is not None:
            return ""
        self._seen += text
        self._state, safe, state_name = TextStateMachine.step(self._state, text)
        safe = str(safe)
        self._sent += len(safe)
        if state_name is None:
            candidates = [stop for stop in self._stops if self._seen.startswith(stop, self._sent)]
            self.matched = min(candidates, key=len) if candidates else self._stops[0]
        return safe

    def flush(self) -> str:
        """Whatever was held back, at the end of the output (no stop sequence followed it)."""
        if self.matched is not None:
            return ""
        self._state, held, _ = TextStateMachine.flush(self._state)
        return str(held)


class Sequence:
    """One job from its cache lease to its final event (created and used on the worker thread only)."""

    def __init__(self, job: Job, kv_cache: KVPromptCache, tokenizer: Any) -> None:
        self.job = job
        self._kv_cache = kv_cache
        self.started = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=len(job.prompt), queue_ms=(self.started - job.enqueued) * 1000)
        self._tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer
        self.stop_text = StopText(job.settings.stop)
        self.generated: list[int] = []
        self.finished = False

    def lease(self) -> CacheLease:
        """KV state for the longest cached prefix of the prompt (a fresh cache when the cache is off)."""
        cache = self._kv_cache
        lease = cache.acquire(self.job.prompt) if self.job.use_cache else CacheLease(cache.new_cache(), 0, "off")
        self.stats.cached_tokens, self.stats.cache_source = lease.cached_tokens, lease.source
        self.stats.prefill_tokens = len(self.job.prompt) - lease.cached_tokens
        if self.job.use_cache:
            self.job.in_context(lambda: self._log_lookup(lease))
        return lease

    def checkpoint_at(self, lease: CacheLease) -> int:
        """Where the prefill should pause to pin a checkpoint (0: nowhere).

        A lease that already covers the stable prefix (system prompt and
        tools) is snapshotted at once; otherwise the prefill stops there.
        """
        prefix = self.job.stable_prefix
        if not (self.job.use_cache and self._kv_cache.enabled) or prefix < MIN_REUSED_TOKENS:
            return 0
        if self._kv_cache.has_checkpoint(self.job.prompt[:prefix]):
            return 0
        if lease.cached_tokens >= prefix:
            self._kv_cache.add_checkpoint(lease.cache, self.job.prompt[:prefix])
            return 0
        return prefix

    def keep_checkpoint(self, cache: list[Any], tokens: list[int]) -> None:
        """A snapshot taken at the stable prefix (the cache is this sequence's own copy)."""
        if len(tokens) == self.job.stable_prefix:
            self._kv_cache.add_checkpoint(cache, tokens, copy=False)

    def token(self, token: int, end_of_sequence: bool) -> None:
        """One generated token; sends its text (less any held-back stop text)."""
        if not self.generated:
            self.stats.time_to_first_token_ms = (time.perf_counter() - self.started) * 1000
        self.generated.append(token)
        if end_of_sequence:
            self.detokenizer.finalize()
        else:
            self.stats.completion_tokens += 1
            self.detokenizer.add_token(token)
        text = self.stop_text.feed(self.detokenizer.last_segment)
        if self.stop_text.matched is not None:
            self.stats.finish_reason, self.stats.stop_sequence = "stop", self.stop_text.matched
        if text:
            self.job.deliver(TokenEvent(text))

    def finish(self, reason: str, cache: list[Any] | None, tokens: list[int] | None) -> None:
        """Store the KV state back (it holds ``tokens``), and send the final event."""
        if self.finished:
            return
        self.finished = True
        if self.stats.stop_sequence is None:
            self.stats.finish_reason = reason
            if reason in ("stop", "length"):
                self.detokenizer.finalize()
                held = self.stop_text.feed(self.detokenizer.last_segment) + self.stop_text.flush()
                if held:
                    self.job.deliver(TokenEvent(held))
        if self.job.use_cache and cache is not None and tokens is not None:
            self._kv_cache.release(cache, tokens, len(self.job.prompt))
        self.stats.generation_ms = (time.perf_counter() - self.started) * 1000
        self.job.in_context(lambda: _log_stop(reason, self.stats.completion_tokens))
        self.job.deliver(TokenEvent("", stats=self.stats))

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.job.deliver(TokenEvent("", error=error))

    def _log_lookup(self, lease: CacheLease) -> None:
        """Keep a miss's explanation for /v1/cache and, at debug level >= 1, log the lookup.

        Runs on the worker between decode steps, so the explanation (template
        renders, decoding, redaction) is only prepared here: it is worked out
        when the debug line is written or /v1/cache is read.
        """
        prompt, stats = self.job.prompt, self.stats
        explain = self._explainer(lease)
        details: dict[str, Any] = {
            "cached_tokens": stats.cached_tokens,
            "new_tokens": len(prompt) - stats.cached_tokens,
        }
        if explain is not None:
            self._kv_cache.record_miss(time.strftime("%Y-%m-%dT%H:%M:%S"), details, explain)
        if not is_debug_enabled():
            return
        key = hashlib.sha256(str(prompt).encode()).hexdigest()[:16]
        if explain is not None:
            details = {**details, **explain()}
        if stats.cached_tokens:
            log_cache_hit("prompt", key, {**details, "source": stats.cache_source})
        else:
            log_cache_miss("prompt", key, str(details.get("reason", "no cached prefix")), details)

    def _explainer(self, lease: CacheLease) -> Callable[[], dict[str, Any]] | None:
        """Where the prompt left the nearest cached entry (a miss or a partial hit), worked out once when asked."""
        if lease.source not in ("miss", "copied-prefix", "checkpoint"):
            return None
        if lease.nearest is None:
            if lease.source != "miss":
                return None
            return lambda: {"reason": "nothing cached shares a prefix with this prompt"}
        at, locate = lease.common_tokens, self.job.locate
        cached = lease.nearest[at : at + EXCERPT_TOKENS].tolist()
        new = self.job.prompt[at : at + EXCERPT_TOKENS]

        @functools.cache
        def explain() -> dict[str, Any]:
            where = locate(at) if locate is not None else None
            if where is not None and where[1] == "system":
                reason = f"the system prompt changed: it differs from the cached one at token {at}"
            elif where is not None:
                reason = f"{where[1]} message {where[0]} differs from the cached conversation at token {at}"
            else:
                reason = f"the prompt differs from the nearest cached one at token {at}"
            return {
                "diverged_at_token": at,
                "diverged_at_message": where[0] if where else None,
                "role": where[1] if where else None,
                "cached_text": self._excerpt(cached),
                "new_text": self._excerpt(new),
                "reason": reason,
            }

        return explain

    def _excerpt(self, tokens: list[int]) -> str:
        text = str(self._tokenizer.decode(tokens)) if tokens else ""
        scrubbed = redact(text)
        text = scrubbed if isinstance(scrubbed, str) else text
        return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


def _log_stop(reason: str, tokens: int) -> None:
    if reason == "cancelled":
        logger.info("Generation stopped after %d tokens: the client disconnected", tokens)
    elif reason == "timeout":
        logger.warning("Generation stopped after %d tokens: the request timed out", tokens)
