"""What a generation request is to the engine's worker, and the steps every decoder shares.

A ``Job`` is one request on the worker thread: its ``GenerationRequest``, its
cancellation and deadline, and how to deliver events back to the request's
event loop.  ``ActiveSequence`` follows a job from its prompt-cache lease to its
last event: the lookup, the checkpoint at the stable prefix, detokenizing,
stop text, stats, and storing the KV state back.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from mlx_server.engine.cache_entries import MIN_REUSED_TOKENS, token_digest
from mlx_server.engine.image_prefill import cache_prompt
from mlx_server.engine.prompt_cache import CacheLease, KVPromptCache
from mlx_server.stop_text import StopText
from mlx_server.vocabulary import (
    EngineEvent,
    FinishReason,
    GeneratedText,
    GenerationFinished,
    GenerationRequest,
    GenerationStats,
    PromptAdmitted,
)

__all__ = ["ActiveSequence", "Delivery", "Job"]

logger = logging.getLogger("mlx")

Delivery = Union[EngineEvent, BaseException]
"""What the worker hands a request's event loop: an event, or the failure that ends it."""


@dataclass
class Job:
    """One request's work, as the worker thread sees it."""

    request: GenerationRequest
    cancelled: threading.Event
    deliver: Callable[[Delivery], None]
    enqueued: float
    deadline: float | None = None  # time.perf_counter() after which generation stops with "timeout"
    context: contextvars.Context | None = None  # the request's logging context (its request id)
    end_requested: threading.Event = field(default_factory=threading.Event)  # the reader has what it needs
    held_for_prefix: bool = False  # it waited for another sequence to compute its stable prefix
    number: int = 0  # its number among the engine's jobs (rank 0's, in a distributed model)
    lockstep: bool = False  # a distributed model's: it stops only when rank 0's step plan says so
    decided_stop: FinishReason | None = None  # what the step plan said
    done: bool = False  # its final event (or failure) was delivered

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def stable_prefix(self) -> int:
        return self.request.stable_prefix

    def in_context(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` so that its log lines carry this request's id."""
        return work() if self.context is None else self.context.run(work)

    @functools.cached_property
    def cache_prompt(self) -> list[int]:
        """The prompt as the prompt cache keys it (images by content; the prompt itself when it has none)."""
        return cache_prompt(self.request)

    @functools.cached_property
    def prefix_key(self) -> str | None:
        """The digest of the stable prefix (what a checkpoint would hold), or None when there is none worth one."""
        prefix = self.cache_prompt[: self.stable_prefix]
        return token_digest(prefix) if self.stable_prefix >= MIN_REUSED_TOKENS else None

    @property
    def final_length(self) -> int:
        """The most tokens this request's KV state can reach: its prompt and every token it may generate."""
        return len(self.prompt) + self.request.max_tokens

    def wanted_stop(self) -> FinishReason | None:
        """Why this request should stop now, from what only this process knows (its client, its clock)."""
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "timeout"
        if self.end_requested.is_set():
            return "stop"
        return None

    def should_stop(self) -> bool:
        """Cancelled or past its deadline (in lockstep: the step plan said it stops)."""
        if self.lockstep:
            return self.decided_stop is not None
        return self.wanted_stop() in ("cancelled", "timeout")

    def stop_reason(self) -> FinishReason:
        if self.lockstep:
            return self.decided_stop or "cancelled"
        return "cancelled" if self.cancelled.is_set() else "timeout"

    def end_wanted(self) -> bool:
        """The reader has what it needs (in lockstep this arrives as a step plan's stop instead)."""
        return not self.lockstep and self.end_requested.is_set()


class ActiveSequence:
    """One job from its cache lease to its final event (created and used on the worker thread only)."""

    def __init__(self, job: Job, prompt_cache: KVPromptCache, tokenizer: Any) -> None:
        self.job = job
        self._prompt_cache = prompt_cache
        self.started = time.perf_counter()
        self.stats = GenerationStats(prompt_tokens=len(job.prompt), queue_ms=(self.started - job.enqueued) * 1000)
        self.detokenizer = tokenizer.detokenizer
        self.stop_text = StopText(job.request.sampling.stop)
        self.generated: list[int] = []
        self.finished = False
        self.turn = 0  # this request's turn in its session's conversation, from its cache lease

    @property
    def use_cache(self) -> bool:
        return self.job.request.use_cache and self._prompt_cache.enabled

    def lease(self) -> CacheLease:
        """KV state for the longest cached prefix of the prompt (a fresh cache when the cache is off).

        Tells the request at once: its cache lookup is what the usage it
        reports will say, before the first token.
        """
        request = self.job.request
        lease = self._prompt_cache.acquire(self.job.cache_prompt, request.lane) if request.use_cache else None
        if lease is None:
            lease = CacheLease(self._prompt_cache.new_cache(), 0, "off")
        self.stats.cached_tokens, self.stats.cache_source = lease.cached_tokens, lease.source
        self.turn = lease.turn
        self.job.deliver(PromptAdmitted(lease.lookup(request.lane), self.job.end_requested.set))
        return lease

    def pause_points(self, lease: CacheLease) -> list[int]:
        """Where the prefill pauses to keep KV state: the stable prefix, and the end of the history.

        The stable prefix (system prompt and tools) becomes a checkpoint every
        conversation shares; a lease that already covers it is copied at once.
        For a cache that cannot step back, the end of the history becomes the
        snapshot the next turn resumes from.
        """
        if not self.use_cache:
            return []
        request, prompt = self.job.request, self.job.cache_prompt
        points = []
        prefix = request.stable_prefix
        if prefix >= MIN_REUSED_TOKENS and not self._prompt_cache.has_checkpoint(prompt[:prefix]):
            if lease.cached_tokens < prefix:
                points.append(prefix)
            elif lease.cached_tokens == prefix or self._prompt_cache.trimmable:
                self._prompt_cache.add_checkpoint(lease.cache, prompt[:prefix])
        end = request.turn_start
        if (
            self._prompt_cache.needs_snapshots
            and lease.cached_tokens < end < len(prompt)
            and end >= MIN_REUSED_TOKENS
            and not self._prompt_cache.has_snapshot(prompt[:end])
        ):
            points.append(end)
        return sorted(set(points))

    def keyed(self, tokens: list[int]) -> list[int]:
        """Tokens of this sequence (its prompt, then what it generated) as the prompt cache keys them."""
        key = self.job.cache_prompt
        if key is self.job.prompt:
            return tokens
        return key[: len(tokens)] + tokens[len(key) :]

    def keep_state(self, cache: list[Any], tokens: list[int]) -> None:
        """KV state taken at a pause point (the cache is this sequence's own copy): a checkpoint or a snapshot."""
        request = self.job.request
        tokens = self.keyed(tokens)
        if len(tokens) == request.turn_start and self._prompt_cache.needs_snapshots:
            if len(tokens) == request.stable_prefix:
                self._prompt_cache.add_checkpoint(cache, tokens)  # a copy: the snapshot keeps this one
            self._prompt_cache.add_snapshot(cache, tokens, request.lane, request.after_user, self.turn)
        elif len(tokens) == request.stable_prefix:
            self._prompt_cache.add_checkpoint(cache, tokens, copy=False)

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
            self.job.deliver(GeneratedText(text))

    def finish(self, reason: FinishReason, cache: list[Any] | None, tokens: list[int] | None) -> None:
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
                    self.job.deliver(GeneratedText(held))
        if self.use_cache and cache is not None and tokens is not None:
            self._prompt_cache.release(cache, self.keyed(tokens), len(self.job.prompt), self.job.request.lane,
                                       self.turn)  # fmt: skip
        self.stats.generation_ms = (time.perf_counter() - self.started) * 1000
        self.job.in_context(lambda: _log_stop(reason, self.stats.completion_tokens))
        self.job.done = True
        self.job.deliver(GenerationFinished(self.stats))

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.job.done = True
            self.job.deliver(error)


def _log_stop(reason: str, tokens: int) -> None:
    if reason == "cancelled":
        logger.info("Generation stopped after %d tokens: the client disconnected", tokens)
    elif reason == "timeout":
        logger.warning("Generation stopped after %d tokens: the request timed out", tokens)
