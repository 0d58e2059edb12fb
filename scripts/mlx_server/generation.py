"""Generation: one owner of the model, one request at a time, tokens streamed as they come.

The engine runs MLX on a single worker thread.  Requests wait in arrival order
(the executor's queue is FIFO) and none fails because another is running.  Each
token is handed to the request's asyncio queue as soon as it is decoded; a
request whose client has gone sets its ``cancelled`` event and the worker stops
after the current token.  Sampling, logits processing, streaming
detokenization and stop-text holdback are mlx-lm's (``make_sampler``,
``make_logits_processors``, ``stream_generate``, ``TextStateMachine``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import TextStateMachine, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_server.model_loading import LoadedModel

__all__ = ["GenerationEngine", "GenerationStats", "SamplingSettings", "TokenEvent"]

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


@dataclass
class GenerationStats:
    """The numbers a user wants about one completion."""

    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"
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


class GenerationEngine:
    """Owns the model and serializes generation on one worker thread (the lock is the thread itself)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-generation")
        self._counter_lock = threading.Lock()
        self._waiting = 0
        self._running = 0

    @property
    def queue_depth(self) -> dict[str, int]:
        with self._counter_lock:
            return {"waiting": self._waiting, "running": self._running}

    def warm_up(self) -> float:
        """Run one short generation so that no request pays MLX's one-time set-up; returns its ms."""
        started = time.perf_counter()
        prompt = list(self.loaded.tokenizer.encode("Hello", add_special_tokens=False)) or [0]
        settings = SamplingSettings(max_tokens=2, temperature=0.0)
        self._executor.submit(
            self._generate, prompt, settings, threading.Event(), lambda _event: None, started
        ).result()
        return (time.perf_counter() - started) * 1000

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def stream(
        self, prompt_tokens: list[int], settings: SamplingSettings, cancelled: threading.Event
    ) -> AsyncIterator[TokenEvent]:
        """Yield text as it is generated, then a final event with the stats.

        Leaving the iteration early (a client that disconnected) sets
        ``cancelled``, which stops the worker within a token.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        with self._counter_lock:
            self._waiting += 1
        enqueued = time.perf_counter()
        job = loop.run_in_executor(self._executor, self._run, prompt_tokens, settings, cancelled, deliver, enqueued)
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

    def _run(
        self,
        prompt_tokens: list[int],
        settings: SamplingSettings,
        cancelled: threading.Event,
        deliver: Callable[[TokenEvent], None],
        enqueued: float,
    ) -> None:
        with self._counter_lock:
            self._waiting -= 1
            self._running += 1
        try:
            deliver(self._generate(prompt_tokens, settings, cancelled, deliver, enqueued))
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            deliver(TokenEvent("", error=error))
        finally:
            with self._counter_lock:
                self._running -= 1

    def _generate(
        self,
        prompt_tokens: list[int],
        settings: SamplingSettings,
        cancelled: threading.Event,
        deliver: Callable[[TokenEvent], None],
        enqueued: float,
    ) -> TokenEvent:
        started = time.perf_counter()
        stats = GenerationStats(prompt_tokens=len(prompt_tokens), queue_ms=(started - enqueued) * 1000)
        if cancelled.is_set():
            stats.finish_reason = "cancelled"
            return TokenEvent("", stats=stats)
        if settings.seed is not None:
            mx.random.seed(settings.seed % 2**64)
        stop_text = TextStateMachine({"normal": [(stop, None) for stop in settings.stop]})
        stop_state = stop_text.make_state()
        responses = stream_generate(
            self.loaded.model,
            self.loaded.tokenizer,
            mx.array(prompt_tokens),
            max_tokens=settings.max_tokens,
            sampler=make_sampler(settings.temperature, settings.top_p, settings.min_p, top_k=settings.top_k),
            logits_processors=make_logits_processors(
                repetition_penalty=settings.repetition_penalty,
                presence_penalty=settings.presence_penalty,
                frequency_penalty=settings.frequency_penalty,
            ),
            prompt_cache=make_prompt_cache(self.loaded.model),
        )
        try:
            for response in responses:
                if stats.completion_tokens == 0:
                    stats.time_to_first_token_ms = (time.perf_counter() - started) * 1000
                stats.completion_tokens = response.generation_tokens
                stop_state, text, state_name = TextStateMachine.step(stop_state, response.text)
                if state_name is None:  # a stop sequence: the text before it goes out, the rest never does
                    stats.finish_reason = "stop"
                    if text:
                        deliver(TokenEvent(text))
                    break
                if response.finish_reason is not None:
                    stats.finish_reason = response.finish_reason
                    if response.finish_reason == "stop":
                        stats.completion_tokens -= 1  # the end-of-sequence token is not part of the answer
                    stop_state, held, _ = TextStateMachine.flush(stop_state)
                    text += held
                if text:
                    deliver(TokenEvent(text))
                if cancelled.is_set():
                    stats.finish_reason = "cancelled"
                    break
        finally:
            responses.close()
        stats.generation_ms = (time.perf_counter() - started) * 1000
        if stats.finish_reason == "cancelled":
            logger.info("Generation stopped after %d tokens: the client disconnected", stats.completion_tokens)
        return TokenEvent("", stats=stats)
