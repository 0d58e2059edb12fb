"""Generation: one worker thread owns the model, and the requests it holds decode together in one batch.

Requests wait in arrival order until the batch has room (``max_batch``
sequences) and the KV budget allows them (``kv_budget``); then they join
between two decode steps, are prefilled in chunks interleaved with the
others' decoding, and leave when they finish, are cancelled or time out,
without stopping the rest (``batch_decoding``).  With ``--kv-bits`` the KV
cache is quantized and requests decode one at a time (``sequential_decoding``).
Each token's text is handed to its request's asyncio queue as soon as it is
decoded.  The worker thread is the only one that touches MLX; other threads
talk to it through the waiting queue and a task queue, under one condition
variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_server.engine.batch_decoding import BatchDecoder
from mlx_server.engine.constrained import GrammarTokenizer
from mlx_server.engine.kv_budget import KV_STEP, KVBudget
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.sequence import Delivery, Job
from mlx_server.engine.sequential_decoding import KV_GROUP_SIZE, SequentialDecoder
from mlx_server.model.loading import LoadedModel
from mlx_server.vocabulary import (
    PLAIN_SAMPLING,
    EngineEvent,
    EngineStats,
    GeneratedText,
    GenerationFinished,
    GenerationRequest,
    GenerationStats,
    GrammarError,
    KeepAlive,
    KVBudgetError,
    ModelUnloadedError,
    PromptCacheStats,
    Sampling,
    SpeculativeMode,
)

__all__ = ["EngineOptions", "GenerationEngine"]

logger = logging.getLogger("mlx")
Result = TypeVar("Result")
KEEPALIVE = KeepAlive()
GREEDY = Sampling(temperature=0.0).over(PLAIN_SAMPLING)

JOIN_INTERVAL_SECONDS = 0.5  # a running batch takes newcomers at most this often (mlx_lm.server's time budget)
GATHER_SECONDS = 0.05  # an idle batch waits this long for requests that arrive together
GATHER_POLL_SECONDS = 0.005
DRAIN_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class EngineOptions:
    """How the engine batches: sequences per batch, prompts prefilled together, the KV budget, KV quantization.

    The defaults live in ``settings`` (one place); the start-up builds these from them.
    """

    max_batch: int
    prefill_batch: int
    kv_budget_bytes: int
    kv_bits: int | None = None  # quantize the KV cache; requests then decode one at a time
    speculative: SpeculativeMode = (
        "off"  # "prompt-lookup": draft from the context, verify in one pass (engine/speculation.py)
    )


class Decoder(Protocol):
    @property
    def active(self) -> int: ...
    @property
    def decoding(self) -> int: ...
    def pending_prefixes(self) -> set[str]: ...
    def final_lengths(self) -> list[int]: ...
    def kv_bytes(self) -> int: ...
    def speculation_totals(self) -> tuple[int, int]: ...
    def admit(self, job: Job) -> None: ...
    def step(self) -> int: ...
    def fail_all(self, error: BaseException) -> None: ...
    def close(self) -> None: ...


def prefill_step() -> int:
    """Prompt tokens per model call during prefill: mlx-lm's 2048 on a GPU, 256 on CPU.

    Measured here (SmolLM2-135M, 2 cores, OpenBLAS): prefilling 2,048 tokens
    took 15.3 s in steps of 256 and 23.5 s in one step; CPU attention over
    large blocks is memory-bound.  A step is also the longest a running
    stream can stall while another request's prompt is prefilled.
    """
    return 2048 if mx.default_device().type == mx.DeviceType.gpu else 256


class _Outbox:
    """Events for one event loop, handed over once per step: one wake-up for the whole batch, not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[tuple[asyncio.Queue[Delivery], Delivery]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue[Delivery], event: Delivery) -> None:
        with self._lock:
            self._pending.append((queue, event))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                self._loop.call_soon_threadsafe(_put_all, pending)


def _put_all(pending: list[tuple[asyncio.Queue[Delivery], Delivery]]) -> None:
    for queue, event in pending:
        queue.put_nowait(event)


class GenerationEngine:
    """Owns the model; batches generation on one worker thread (shared state under ``_condition``)."""

    def __init__(self, loaded: LoadedModel, prompt_cache: KVPromptCache, options: EngineOptions) -> None:
        self.loaded = loaded
        self.prompt_cache = prompt_cache
        self.options = options
        self.max_batch = 1 if self.options.kv_bits else self.options.max_batch
        self.grammar_tokenizer = GrammarTokenizer(loaded.tokenizer)
        self._prefill_step = prefill_step()
        self._condition = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stopping = False
        self._running = 0
        self._in_flight: Callable[[], int] | None = None
        self._steps = 0
        self._generated = 0
        self._drafted = self._accepted = 0  # speculative decoding, over finished requests
        self._active_bytes = 0
        self._step_observers: list[Callable[[int], None]] = []
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}
        self._last_join = 0.0
        self._ready: Future[KVBudget] = Future()
        self._thread = threading.Thread(target=self._work, name="mlx-generation", daemon=True)
        self._thread.start()
        self.budget: KVBudget = self._ready.result()

    # -- what callers ask --------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        """The longest a prompt plus its completion may be: the model's context, or less if the KV budget says so."""
        return min(self.loaded.context_length, self.budget.max_sequence_tokens)

    @property
    def model_info(self) -> dict[str, Any]:
        return self.loaded.describe()

    def cache_stats(self) -> PromptCacheStats:
        return self.prompt_cache.stats()

    def cache_entries(self) -> list[dict[str, Any]]:
        return self.prompt_cache.describe_entries()

    def stats(self) -> EngineStats:
        with self._condition:
            return EngineStats(
                waiting=len(self._waiting),
                running=self._running,
                max_batch=self.max_batch,
                decode_steps=self._steps,
                generated_tokens=self._generated,
                active_kv_bytes=self._active_bytes,
                kv_budget_bytes=self.budget.total_bytes,
                kv_bytes_per_token=self.budget.bytes_per_token,
                drafted_tokens=self._drafted,
                accepted_tokens=self._accepted,
            )

    def count_arrivals(self, in_flight: Callable[[], int]) -> None:
        """Read the requests the server has accepted (``in_flight()``), to start a lone request at once.

        Without it an idle engine always gathers for ``GATHER_SECONDS``; with it,
        it gathers only while accepted requests have yet to reach it.
        """
        self._in_flight = in_flight

    def observe_steps(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(batch size)`` after every decode step (from the worker thread)."""
        self._step_observers.append(observer)

    # -- lifecycle ---------------------------------------------------------------

    def warm_up(self) -> float:
        """Run one short generation and build the grammar tokenizer, so that no request pays a one-time set-up.

        Returns the milliseconds it took.
        """
        started = time.perf_counter()
        prompt = list(self.tokenizer.encode("Hello", add_special_tokens=False)) or [0]
        finished = threading.Event()
        request = GenerationRequest(prompt, max_tokens=2, sampling=GREEDY, use_cache=False)

        def deliver(event: Delivery) -> None:
            if isinstance(event, (GenerationFinished, BaseException)):
                finished.set()

        self._enqueue(Job(request, threading.Event(), deliver, started))
        finished.wait()
        with contextlib.suppress(GrammarError):  # logged; constrained requests then get a clear 400
            self.grammar_tokenizer.get()
        return (time.perf_counter() - started) * 1000

    def prefill_checkpoint(self, tokens: list[int]) -> bool:
        """Compute the KV state of ``tokens`` and pin it as a checkpoint (the --warm-prompt path)."""

        def run() -> bool:
            if self.prompt_cache.has_checkpoint(tokens):
                return False
            cache = self.prompt_cache.new_cache()
            for start in range(0, len(tokens), self._prefill_step):
                self.loaded.model(mx.array(tokens[start : start + self._prefill_step])[None], cache=cache)
                mx.eval([layer.state for layer in cache])
            return self.prompt_cache.add_checkpoint(cache, tokens, copy=False)

        return self._on_worker(run)

    def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Stop the worker, after at most ``drain_seconds`` for what runs and waits to finish.

        Whatever is still running or waiting then ends with ModelUnloadedError
        (its client gets an error response or an in-stream error event), and so
        does any request that arrives later.
        """
        deadline = time.monotonic() + drain_seconds
        with self._condition:
            while (self._waiting or self._running) and time.monotonic() < deadline:
                self._condition.wait(DRAIN_POLL_SECONDS)
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=60)

    # -- requests ------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        """``PromptAdmitted`` when the request joins the batch, text as it is generated, then ``GenerationFinished``.

        Leaving the iteration early (a client that disconnected) cancels the
        request: it leaves the batch at the next step.  KVBudgetError when it
        cannot fit the KV budget even alone, GrammarError when its grammar
        cannot run.  See ``GenerationRequest`` for the timeout and keep-alives.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Delivery] = asyncio.Queue()
        enqueued = time.perf_counter()
        deadline = enqueued + request.timeout if request.timeout else None
        outbox = self._outbox_for(loop)
        cancelled = threading.Event()
        job = Job(request, cancelled, lambda event: outbox.post(events, event), enqueued, deadline,
                  contextvars.copy_context())  # fmt: skip
        self._enqueue(job)
        keepalive = request.keepalive
        timer = loop.call_later(keepalive, events.put_nowait, KEEPALIVE) if keepalive else None
        try:
            while True:
                event = await events.get()
                if timer is not None:
                    timer.cancel()
                    timer = loop.call_later(keepalive, events.put_nowait, KEEPALIVE)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationFinished):
                    break
        finally:
            if timer is not None:
                timer.cancel()
            cancelled.set()
            with self._condition:
                self._condition.notify_all()

    async def complete(self, request: GenerationRequest) -> tuple[str, GenerationStats]:
        """The whole text and its stats, for in-process callers (benchmarks, tests)."""
        parts: list[str] = []
        async for event in self.stream(request):
            if isinstance(event, GeneratedText):
                parts.append(event.text)
            elif isinstance(event, GenerationFinished):
                return "".join(parts), event.stats
        raise AssertionError("the stream ends with GenerationFinished or raises")

    def _outbox_for(self, loop: asyncio.AbstractEventLoop) -> _Outbox:
        with self._condition:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = _Outbox(loop)
            return outbox

    def _enqueue(self, job: Job) -> None:
        with self._condition:
            stopping = self._stopping
            if not stopping:
                self._waiting.append(job)
                self._condition.notify_all()
        if stopping:  # the worker no longer flushes: hand the refusal over at once
            job.deliver(ModelUnloadedError(self.loaded.name))
            self._flush()

    def _on_worker(self, task: Callable[[], Result]) -> Result:
        future: Future[Result] = Future()
        with self._condition:
            self._tasks.append((task, future))
            self._condition.notify_all()
        return future.result()

    # -- the worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        try:
            budget = KVBudget(self.options.kv_budget_bytes, self._bytes_per_token())
            decoder = self._decoder()
        except Exception as error:  # noqa: BLE001 - reported to the constructor, which raises it
            self._ready.set_exception(error)
            return
        self._ready.set_result(budget)
        try:
            while self._wait_for_work(decoder):
                self._run_tasks()
                if self._stopping:
                    decoder.fail_all(ModelUnloadedError(self.loaded.name))
                    self._flush()
                    continue
                self._admit(decoder)
                if decoder.active:
                    self._step(decoder)
                self._flush()
        finally:
            self._end_waiting()
            decoder.close()

    def _decoder(self) -> Decoder:
        if self.options.kv_bits:
            return SequentialDecoder(
                self.loaded, self.prompt_cache, self.grammar_tokenizer, self._prefill_step, self.options.kv_bits
            )
        return BatchDecoder(
            self.loaded, self.prompt_cache, self.grammar_tokenizer, self.max_batch, self._prefill_step,
            self.options.prefill_batch, self.options.speculative,
        )  # fmt: skip

    def _bytes_per_token(self) -> int:
        """KV bytes one token takes in this model's cache (measured on one cache step, quantized if asked)."""
        cache = make_prompt_cache(self.loaded.model)
        self.loaded.model(mx.zeros((1, KV_STEP), dtype=mx.int32), cache=cache)
        if self.options.kv_bits:
            cache = [layer.to_quantized(group_size=KV_GROUP_SIZE, bits=self.options.kv_bits) for layer in cache]
        mx.eval([layer.state for layer in cache])
        return max(1, sum(int(layer.nbytes) for layer in cache) // KV_STEP)

    def _wait_for_work(self, decoder: Decoder) -> bool:
        """Block until there is something to do; False when stopping and nothing is decoding."""
        with self._condition:
            while not (self._waiting or self._tasks or decoder.active or self._stopping):
                self._condition.wait()
            if self._waiting and not decoder.active and not self._tasks and not self._stopping and self._more_coming():
                # An idle batch gathers a burst; it looks again every few ms, since the request that
                # seemed on its way may be one that just finished (still sending its last bytes).
                gathered = time.perf_counter() - self._waiting[0].enqueued
                self._condition.wait(min(GATHER_POLL_SECONDS, max(0.0, GATHER_SECONDS - gathered)))
            return not (self._stopping and not decoder.active and not self._tasks)

    def _run_tasks(self) -> None:
        with self._condition:
            tasks = list(self._tasks)
            self._tasks.clear()
        for task, future in tasks:
            try:
                future.set_result(task())
            except Exception as error:  # noqa: BLE001 - handed to the caller, which raises it
                future.set_exception(error)

    def _should_admit(self, decoder: Decoder) -> bool:
        """Whether waiting jobs join now, or gather for one larger join.

        Every join costs mlx-lm a prefill call, a forward pass for the
        newcomers alone and a copy of the whole batch's KV state, and stalls
        the decoding sequences meanwhile, so joins are grouped: a batch with
        streams decoding takes newcomers at most every ``JOIN_INTERVAL_SECONDS``
        (as mlx_lm.server's time budget does); one that is still prefilling
        takes them at once (they join its prefill; nobody is stalled), and so
        does one whose waiting jobs held back only for a stable prefix it has
        now computed (they arrived with it); an idle
        one waits ``GATHER_SECONDS`` for requests that arrive together
        (clients that fan out), or less when a prefill batch's worth is
        already waiting or no accepted request is still on its way (a lone
        request starts at once).
        """
        if not decoder.active:
            waited = time.perf_counter() - self._waiting[0].enqueued
            full = len(self._waiting) >= self.options.prefill_batch
            return waited >= GATHER_SECONDS or full or not self._more_coming()
        if not decoder.decoding:
            return True
        computing = decoder.pending_prefixes()
        if any(job.held_for_prefix and job.prefix_key not in computing for job in self._waiting):
            return True  # they came with the sequence whose prefix they waited for: they join it now
        return time.perf_counter() - self._last_join >= JOIN_INTERVAL_SECONDS

    def _more_coming(self) -> bool:
        """Whether requests the server accepted have yet to reach the engine (unknown: assume so)."""
        if self._in_flight is None:
            return True
        return self._in_flight() > len(self._waiting) + self._running

    def _admit(self, decoder: Decoder) -> None:
        """Move waiting jobs into the batch, in arrival order, while there is room in the batch and the budget."""
        with self._condition:
            if not self._waiting or not self._should_admit(decoder):
                return
        while True:
            with self._condition:
                if not self._waiting or self._stopping or decoder.active >= self.max_batch:
                    return
                index = self._next_admissible(decoder.pending_prefixes())
                if index is None:
                    return  # everything that waits shares a prefix that is being computed
                job = self._waiting[index]
                lengths = [*decoder.final_lengths(), job.final_length]
                if not self.budget.fits(lengths):
                    if decoder.active:
                        return  # it waits until running sequences leave
                    del self._waiting[index]
                    job.deliver(KVBudgetError(self._too_large(job)))
                    self._flush()
                    continue
                del self._waiting[index]
            self.prompt_cache.trim_to(self.budget.total_bytes - self.budget.batch_bytes(lengths))
            self._last_join = time.perf_counter()
            decoder.admit(job)  # a job that was cancelled while it waited finishes here without joining
            with self._condition:
                self._running = decoder.active

    def _next_admissible(self, computing: set[str]) -> int | None:
        """The first waiting job that does not need a stable prefix another sequence is prefilling now.

        Subagents start together with the same system prompt and tools: one
        prefills it, the others wait until its checkpoint is pinned and start
        from there, instead of all computing the same thousands of tokens.
        """
        for index, job in enumerate(self._waiting):
            if job.prefix_key is None or job.prefix_key not in computing:
                return index
            job.held_for_prefix = True
        return None

    def _too_large(self, job: Job) -> str:
        return (
            f"the request needs the KV state of {job.final_length} tokens, more than the "
            f"{self.budget.max_sequence_tokens} that fit the KV budget ({self.budget.total_bytes} bytes, --kv-budget)"
        )

    def _step(self, decoder: Decoder) -> None:
        batch = decoder.active
        try:
            generated = decoder.step()
        except Exception as error:
            logger.error("Generation step failed: %s: %s", type(error).__name__, error, exc_info=error)
            decoder.fail_all(error)
            generated = 0
        self.prompt_cache.trim_to(self.budget.total_bytes - self.budget.batch_bytes(decoder.final_lengths()))
        with self._condition:
            self._steps += 1
            self._generated += generated
            self._running = decoder.active
            self._active_bytes = decoder.kv_bytes()
            self._drafted, self._accepted = decoder.speculation_totals()
        for observer in self._step_observers:
            observer(batch)

    def _flush(self) -> None:
        with self._condition:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.flush()

    def _end_waiting(self) -> None:
        """The engine stops: what still waits ends with ModelUnloadedError (a cancelled one just ends)."""
        with self._condition:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            if job.cancelled.is_set():
                job.deliver(GenerationFinished(GenerationStats(len(job.prompt), finish_reason="cancelled")))
            else:
                job.deliver(ModelUnloadedError(self.loaded.name))
        self._flush()
