"""Generation: one owner of the model, one request at a time, tokens streamed as they come.

The engine runs MLX on a single worker thread.  Each request leases KV state
from the prompt cache (the longest cached prefix of its tokens), keeps a
checkpoint at the end of the stable prefix (system prompt plus tools), and
stores its state back when it ends, cancelled or not.  Requests wait in arrival order
(the executor's queue is FIFO) and none fails because another is running.  Each
token is handed to the request's asyncio queue as soon as it is decoded; a
request whose client has gone sets its ``cancelled`` event and the worker stops
after the current token.  Sampling, logits processing, streaming
detokenization and stop-text holdback are mlx-lm's (``make_sampler``,
``make_logits_processors``, ``stream_generate``, ``TextStateMachine``); a
grammar, when the request has one, masks the logits last (``grammar``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import TextStateMachine, stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_server.grammar import GrammarError, GrammarProcessor, GrammarTokenizer
from mlx_server.model_loading import LoadedModel
from mlx_server.prompt_cache import MIN_REUSED_TOKENS, KVPromptCache
from utils_logging import log_cache_hit, log_cache_miss

__all__ = ["GenerationEngine", "GenerationStats", "SamplingSettings", "StopText", "TokenEvent"]

logger = logging.getLogger("mlx")


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
class _Job:
    """One request's work, as the worker thread sees it."""

    prompt: list[int]
    stable_prefix: int
    settings: SamplingSettings
    cancelled: threading.Event
    deliver: Callable[[TokenEvent], None]
    enqueued: float
    use_cache: bool = True
    deadline: float | None = None  # time.perf_counter() after which generation stops with "timeout"

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


class _PrefillInterruptedError(Exception):
    """Raised from mlx-lm's prefill progress callback to stop a cancelled or timed-out prefill between steps."""


def prefill_step() -> int:
    """Prompt tokens per model call during prefill: mlx-lm's 2048 on a GPU, 256 on CPU.

    Measured here (SmolLM2-135M, 2 cores, OpenBLAS): prefilling 2,048 tokens
    took 15.3 s in steps of 256 and 23.5 s in one step; CPU attention over
    large blocks is memory-bound.
    """
    return 2048 if mx.default_device().type == mx.DeviceType.gpu else 256


class GenerationEngine:
    """Owns the model and serializes generation on one worker thread (the lock is the thread itself)."""

    def __init__(self, loaded: LoadedModel, kv_cache: KVPromptCache) -> None:
        self.loaded = loaded
        self.kv_cache = kv_cache
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-generation")
        self._counter_lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._prefill_step = prefill_step()
        self.grammar_tokenizer = GrammarTokenizer(loaded.tokenizer)

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def queue_depth(self) -> dict[str, int]:
        with self._counter_lock:
            return {"waiting": self._waiting, "running": self._running}

    def warm_up(self) -> float:
        """Run one short generation and build the grammar tokenizer, so that no request pays a one-time set-up.

        Returns the milliseconds it took.
        """
        started = time.perf_counter()
        prompt = list(self.loaded.tokenizer.encode("Hello", add_special_tokens=False)) or [0]
        settings = SamplingSettings(max_tokens=2, temperature=0.0)
        job = _Job(prompt, 0, settings, threading.Event(), lambda _event: None, started, use_cache=False)
        self._executor.submit(self._generate, job).result()
        with contextlib.suppress(GrammarError):  # logged; constrained requests then get a clear 400
            self.grammar_tokenizer.get()
        return (time.perf_counter() - started) * 1000

    def prefill_checkpoint(self, tokens: list[int]) -> bool:
        """Compute the KV state of ``tokens`` and pin it as a checkpoint (the --warm-prompt path)."""

        def run() -> bool:
            if self.kv_cache.has_checkpoint(tokens):
                return False
            cache = self.kv_cache.new_cache()
            self._prefill(cache, tokens, lambda: False)
            return self.kv_cache.add_checkpoint(cache, tokens)

        return self._executor.submit(run).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def stream(
        self,
        prompt_tokens: list[int],
        settings: SamplingSettings,
        cancelled: threading.Event,
        stable_prefix: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Yield text as it is generated, then a final event with the stats.

        Leaving the iteration early (a client that disconnected) sets
        ``cancelled``, which stops the worker within a token (or a prefill
        step).  ``stable_prefix`` is where a checkpoint should be kept (0:
        none).  After ``timeout`` seconds from now, waiting included,
        generation stops with finish_reason ``timeout``.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        with self._counter_lock:
            self._waiting += 1
        enqueued = time.perf_counter()
        context = contextvars.copy_context()  # the worker's log lines keep this request's id
        deadline = enqueued + timeout if timeout else None
        work = _Job(prompt_tokens, stable_prefix, settings, cancelled, deliver, enqueued, deadline=deadline)
        job = loop.run_in_executor(self._executor, context.run, self._run, work)
        try:
            while True:
                event = await events.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.final:
                    break
            await job
        finally:
            cancelled.set()

    def _run(self, job: _Job) -> None:
        with self._counter_lock:
            self._waiting -= 1
            self._running += 1
        try:
            job.deliver(self._generate(job))
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            job.deliver(TokenEvent("", error=error))
        finally:
            with self._counter_lock:
                self._running -= 1

    def _prefill(self, cache: list[Any], tokens: list[int], should_stop: Callable[[], bool]) -> int:
        """Run ``tokens`` through the model into ``cache``, in steps; returns how many were processed.

        mlx-lm's generate_step does the same inside generation; it is done
        here only to stop exactly at the stable prefix and snapshot it.
        """
        done = 0
        while done < len(tokens) and not should_stop():
            chunk = tokens[done : done + self._prefill_step]
            self.loaded.model(mx.array(chunk)[None], cache=cache)
            mx.eval([layer.state for layer in cache])
            done += len(chunk)
        return done

    def _generate(self, job: _Job) -> TokenEvent:
        prompt_tokens, stable_prefix, enqueued, use_cache = job.prompt, job.stable_prefix, job.enqueued, job.use_cache
        started = time.perf_counter()
        stats = GenerationStats(prompt_tokens=len(prompt_tokens), queue_ms=(started - enqueued) * 1000)
        if job.should_stop():
            stats.finish_reason = job.stop_reason()
            return TokenEvent("", stats=stats)
        lease = self.kv_cache.acquire(prompt_tokens) if use_cache else None
        cache = lease.cache if lease is not None else self.kv_cache.new_cache()
        start = lease.cached_tokens if lease is not None else 0
        stats.cached_tokens, stats.cache_source = start, lease.source if lease is not None else "off"
        if use_cache:
            self._log_lookup(prompt_tokens, stats)
        generated: list[int] = []
        completed = False
        try:
            if use_cache and stable_prefix >= MIN_REUSED_TOKENS:
                start = self._keep_checkpoint(cache, prompt_tokens, start, stable_prefix, job.should_stop)
            stats.prefill_tokens = len(prompt_tokens) - stats.cached_tokens
            if not job.should_stop():
                self._decode(cache, prompt_tokens[start:], job, stats, generated, started)
            else:
                stats.finish_reason = job.stop_reason()
            completed = True
        finally:
            # A request that ended normally or was cancelled leaves consistent state; an error leaves none.
            if use_cache and completed:
                self.kv_cache.release(cache, prompt_tokens + generated, len(prompt_tokens))
        stats.generation_ms = (time.perf_counter() - started) * 1000
        if stats.finish_reason == "cancelled":
            logger.info("Generation stopped after %d tokens: the client disconnected", stats.completion_tokens)
        elif stats.finish_reason == "timeout":
            logger.warning("Generation stopped after %d tokens: the request timed out", stats.completion_tokens)
        return TokenEvent("", stats=stats)

    def _keep_checkpoint(
        self, cache: list[Any], prompt: list[int], start: int, stable_prefix: int, should_stop: Callable[[], bool]
    ) -> int:
        """Make sure a checkpoint exists at the stable prefix; returns where generation resumes."""
        prefix = prompt[:stable_prefix]
        if start >= stable_prefix:
            if not self.kv_cache.has_checkpoint(prefix):
                self.kv_cache.add_checkpoint(cache, prefix)
            return start
        if self.kv_cache.has_checkpoint(prefix):
            return start
        processed = self._prefill(cache, prompt[start:stable_prefix], should_stop)
        if start + processed == stable_prefix:
            self.kv_cache.add_checkpoint(cache, prefix)
        return start + processed

    def _log_lookup(self, prompt: list[int], stats: GenerationStats) -> None:
        key = hashlib.sha256(str(prompt).encode()).hexdigest()[:16]
        details = {"cached_tokens": stats.cached_tokens, "new_tokens": len(prompt) - stats.cached_tokens}
        if stats.cached_tokens:
            log_cache_hit("prompt", key, {**details, "source": stats.cache_source})
        else:
            log_cache_miss("prompt", key, f"no cached prefix; {details['new_tokens']} new tokens")

    def _logits_processors(self, settings: SamplingSettings) -> list[Callable[[mx.array, mx.array], mx.array]]:
        """mlx-lm's penalties, then the grammar's mask (last, so that nothing can re-allow a masked token)."""
        processors: list[Callable[[mx.array, mx.array], mx.array]] = make_logits_processors(
            repetition_penalty=settings.repetition_penalty,
            presence_penalty=settings.presence_penalty,
            frequency_penalty=settings.frequency_penalty,
        )
        if settings.grammar is not None:
            processors.append(GrammarProcessor(self.grammar_tokenizer.get(), settings.grammar))
        return processors

    def _decode(
        self,
        cache: list[Any],
        remaining: list[int],
        job: _Job,
        stats: GenerationStats,
        generated: list[int],
        started: float,
    ) -> None:
        settings, deliver = job.settings, job.deliver

        def stop_prefill_if_asked(_processed: int, _total: int) -> None:
            if job.should_stop():
                raise _PrefillInterruptedError

        if settings.seed is not None:
            mx.random.seed(settings.seed % 2**64)
        stop_text = StopText(settings.stop)
        responses = stream_generate(
            self.loaded.model,
            self.loaded.tokenizer,
            mx.array(remaining),
            max_tokens=settings.max_tokens,
            sampler=make_sampler(settings.temperature, settings.top_p, settings.min_p, top_k=settings.top_k),
            logits_processors=self._logits_processors(settings),
            prompt_cache=cache,
            prefill_step_size=self._prefill_step,
            prompt_progress_callback=stop_prefill_if_asked,
        )
        try:
            for response in responses:
                generated.append(int(response.token))
                if stats.completion_tokens == 0:
                    stats.time_to_first_token_ms = (time.perf_counter() - started) * 1000
                stats.completion_tokens = response.generation_tokens
                text = stop_text.feed(response.text)
                if stop_text.matched is not None:  # a stop sequence: the text before it goes out, the rest never does
                    stats.finish_reason, stats.stop_sequence = "stop", stop_text.matched
                    if text:
                        deliver(TokenEvent(text))
                    break
                if response.finish_reason is not None:
                    stats.finish_reason = response.finish_reason
                    if response.finish_reason == "stop":
                        stats.completion_tokens -= 1  # the end-of-sequence token is not part of the answer
                    text += stop_text.flush()
                if text:
                    deliver(TokenEvent(text))
                if job.should_stop():
                    stats.finish_reason = job.stop_reason()
                    break
        except _PrefillInterruptedError:
            stats.finish_reason = job.stop_reason()
        finally:
            responses.close()
