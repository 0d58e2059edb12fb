"""What a generation request is to the engine's worker, and the steps every decoder shares.

A ``Job`` is one request on the worker thread, the same on every rank of a
distributed model: its ``GenerationRequest``, its number, how to deliver
events back to the request's event loop (nowhere, on a rank that only
follows), its state, and the stop a step plan decided for it.  It carries no
signal of its own: whether a client left, a deadline passed or a reader has
what it needs is the scheduler's to notice and a plan's to say
(``scheduler``).  ``ActiveSequence`` follows a job from its prompt-cache lease
to its last event: the lookup, the KV state kept on the way (where, the
prompt cache decides), detokenizing, stop text, stats, and storing the KV
state back.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

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

__all__ = ["ActiveSequence", "Delivery", "Job", "JobState", "nowhere"]

logger = logging.getLogger("mlx")

Delivery = Union[EngineEvent, BaseException]
"""What the worker hands a request's event loop: an event, or the failure that ends it."""
JobState = Literal["waiting", "running", "done"]


def nowhere(_event: Delivery) -> None:
    """Where a following rank's events go: rank 0 answers the clients."""


@dataclass
class Job:
    """One request's work, as the worker thread sees it (the same on every rank)."""

    request: GenerationRequest
    deliver: Callable[[Delivery], None] = nowhere
    enqueued: float = 0.0  # time.perf_counter() when it was submitted (rank 0's)
    context: contextvars.Context | None = None  # the request's logging context (its request id)
    number: int = 0  # its number among the engine's jobs (rank 0's, in a distributed model)
    state: JobState = "waiting"
    stop: FinishReason | None = None  # decided by a step plan: the sequence leaves at its next step, for this

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def stable_prefix(self) -> int:
        return self.request.stable_prefix

    @property
    def leaving(self) -> bool:
        """A plan stopped it before it could finish (its client left, or its deadline passed)."""
        return self.stop in ("cancelled", "timeout")

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
        self.job.deliver(PromptAdmitted(lease.lookup(request.lane)))
        return lease

    def pause_points(self, lease: CacheLease) -> list[int]:
        """Where the prefill pauses to keep KV state (the prompt cache decides: ``KVPromptCache.pause_points``)."""
        if not self.use_cache:
            return []
        return self._prompt_cache.pause_points(lease, self.job.cache_prompt, self.job.request)

    def keyed(self, tokens: list[int]) -> list[int]:
        """Tokens of this sequence (its prompt, then what it generated) as the prompt cache keys them."""
        key = self.job.cache_prompt
        if key is self.job.prompt:
            return tokens
        return key[: len(tokens)] + tokens[len(key) :]

    def keep_state(self, cache: list[Any], tokens: list[int]) -> None:
        """KV state taken at a pause point (this sequence's own copy): the prompt cache keeps what it asked for."""
        self._prompt_cache.keep_paused(cache, self.keyed(tokens), self.job.request, self.turn)

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
        self.job.state = "done"
        self.job.deliver(GenerationFinished(self.stats))

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self.job.state = "done"
            self.job.deliver(error)


def _log_stop(reason: str, tokens: int) -> None:
    if reason == "cancelled":
        logger.info("Generation stopped after %d tokens: the client disconnected", tokens)
    elif reason == "timeout":
        logger.warning("Generation stopped after %d tokens: the request timed out", tokens)
