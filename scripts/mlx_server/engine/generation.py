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
from mlx_server.engine.lockstep import HEARTBEAT_SECONDS, Lockstep, StepPlan
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.sequence import ActiveSequence, Delivery, Job
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
    ModelUnavailableError,
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


def _nowhere(_event: Delivery) -> None:
    """Where a follower rank's events go: rank 0 answers the clients."""


def _put_all(pending: list[tuple[asyncio.Queue[Delivery], Delivery]]) -> None:
    for queue, event in pending:
        queue.put_nowait(event)


class GenerationEngine:
    """Owns the model; batches generation on one worker thread (shared state under ``_condition``)."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompt_cache: KVPromptCache,
        options: EngineOptions,
        lockstep: Lockstep | None = None,
    ) -> None:
        self.loaded = loaded
        self.prompt_cache = prompt_cache
        self.options = options
        self._lockstep = lockstep  # a distributed model's: rank 0 leads every step, the other ranks follow
        self.max_batch = 1 if self.options.kv_bits else self.options.max_batch
        self.grammar_tokenizer = GrammarTokenizer(loaded.tokenizer)
        self._prefill_step = prefill_step()
        self._condition = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._checkpoints: deque[tuple[list[int], Future[bool]]] = deque()  # stable prefixes to prefill and pin
        self._tasks: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # one process only (tests, tools)
        self._jobs: dict[int, Job] = {}  # in lockstep: the admitted jobs, by number
        self._numbered = 0
        self._now = 0.0  # in lockstep: the clock of the step being run (rank 0's)
        self._failure: str | None = None
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
        future: Future[bool] = Future()
        with self._condition:
            self._checkpoints.append((tokens, future))
            self._condition.notify_all()
        return future.result()

    def _prefill_checkpoint(self, tokens: list[int]) -> bool:
        if self.prompt_cache.has_checkpoint(tokens):
            return False
        cache = self.prompt_cache.new_cache()
        for start in range(0, len(tokens), self._prefill_step):
            self.loaded.model(mx.array(tokens[start : start + self._prefill_step])[None], cache=cache)
            mx.eval([layer.state for layer in cache])
        return self.prompt_cache.add_checkpoint(cache, tokens, copy=False)

    @property
    def failure(self) -> str | None:
        """Why the model can no longer run (a distributed rank stopped), or None."""
        with self._condition:
            return self._failure

    def wait_until_stopped(self) -> None:
        """Block until the worker ends (a follower rank: when rank 0 stops serving)."""
        self._thread.join()

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
            stopping, failure = self._stopping, self._failure
            if not stopping and failure is None:
                job.lockstep = self._lockstep is not None
                self._waiting.append(job)
                self._condition.notify_all()
        if failure is not None:
            job.deliver(ModelUnavailableError(failure))
            self._flush()
        elif stopping:  # the worker no longer flushes: hand the refusal over at once
            job.deliver(ModelUnloadedError(self.loaded.name))
            self._flush()

    def _on_worker(self, task: Callable[[], Result]) -> Result:
        """Run ``task`` on the worker thread between steps (one process only: the ranks could not follow it)."""
        if self._lockstep is not None:
            raise RuntimeError("a distributed model's ranks run only step plans")
        future: Future[Result] = Future()
        with self._condition:
            self._tasks.append((task, future))
            self._condition.notify_all()
        return future.result()

    def abandon(self, reason: str) -> None:
        """The model can no longer run (a distributed rank stopped): fail what waits and runs, and what comes.

        Called from outside the worker thread, which may be stuck in a collective.
        """
        error = ModelUnavailableError(f"model {self.loaded.name!r} is unavailable: {reason}")
        with self._condition:
            self._failure = error.message
            pending = [*self._waiting, *(job for job in self._jobs.values() if not job.done)]
            self._waiting.clear()
        for job in pending:
            job.done = True
            job.deliver(error)
        self._flush()

    # -- the worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        try:
            if self._lockstep is not None:
                # Before the first step on every rank: built lazily inside a step (a follower's first grammar),
                # its seconds on a 151k-token vocabulary would leave the other ranks waiting in a collective.
                with contextlib.suppress(GrammarError):  # logged; constrained requests then get a clear 400
                    self.grammar_tokenizer.get()
            budget = self._agreed_budget()
            decoder = self._decoder()
        except Exception as error:  # noqa: BLE001 - reported to the constructor, which raises it
            self._ready.set_exception(error)
            return
        self._ready.set_result(budget)
        try:
            if self._lockstep is None:
                self._serve(decoder)
            elif self._lockstep.leader:
                self._lead(decoder, self._lockstep)
            else:
                self._follow(decoder, self._lockstep)
        finally:
            self._end_waiting()
            decoder.close()

    def _agreed_budget(self) -> KVBudget:
        """The KV budget; in lockstep every rank takes rank 0's figures and random seed, and decides by tokens."""
        bytes_per_token = self._bytes_per_token()
        if self._lockstep is None:
            return KVBudget(self.options.kv_budget_bytes, bytes_per_token)
        lockstep = self._lockstep
        bytes_per_token = lockstep.agree(bytes_per_token)
        total = lockstep.agree(self.options.kv_budget_bytes)
        self.prompt_cache.max_bytes = lockstep.agree(self.prompt_cache.max_bytes)
        self.prompt_cache.in_lockstep(lambda: self._now, bytes_per_token)
        mx.random.seed(lockstep.agree(int(time.time_ns() % 2**31)))
        return KVBudget(total, bytes_per_token)

    def _serve(self, decoder: Decoder) -> None:
        """One process: requests join as the admission rules allow, and the batch steps."""
        while self._wait_for_work(decoder):
            self._run_checkpoints(self._take_checkpoints())
            self._run_tasks()
            if self._stopping:
                decoder.fail_all(ModelUnloadedError(self.loaded.name))
                self._flush()
                continue
            self._join(decoder, self._choose(decoder))
            if decoder.active:
                self._step(decoder)
            self._flush()

    def _lead(self, decoder: Decoder, lockstep: Lockstep) -> None:
        """Rank 0: decide each step (at least every heartbeat), share the plan, and run it as every rank does."""
        while True:
            self._wait_for_work(decoder, HEARTBEAT_SECONDS)
            checkpoints = self._take_checkpoints()
            with self._condition:
                stopping = self._stopping and not decoder.active
            chosen = [] if stopping else self._choose(decoder)
            stops = {number: reason for number, job in self._jobs.items()
                     if job.decided_stop is None and (reason := job.wanted_stop()) is not None}  # fmt: skip
            if self._stopping:
                stops |= {number: "cancelled" for number, job in self._jobs.items() if job.decided_stop is None}
            plan = StepPlan(time.monotonic(), [(job.number, job.request) for job in chosen], stops,
                            [tokens for tokens, _ in checkpoints], stopping)  # fmt: skip
            with lockstep.collective():
                if not self._shared(lockstep, plan):
                    return
                self._run_plan(decoder, plan, chosen, checkpoints)
            self._flush()
            if stopping:
                return

    def _follow(self, decoder: Decoder, lockstep: Lockstep) -> None:
        """Another rank: run rank 0's plans until it says serving ends (their events go nowhere)."""
        logger.info("%s follows rank 0's steps", lockstep.run.describe())
        while True:
            with lockstep.collective():
                try:
                    plan = lockstep.share(None)
                except RuntimeError:
                    return  # said and handled by the lockstep: this process ends
                jobs = [Job(request, threading.Event(), _nowhere, time.perf_counter(), number=number, lockstep=True)
                        for number, request in plan.admitted]  # fmt: skip
                self._run_plan(decoder, plan, jobs, [(tokens, Future()) for tokens in plan.checkpoints])
            if plan.stopping:
                logger.info("%s: rank 0 stopped serving", lockstep.run.describe())
                return

    @staticmethod
    def _shared(lockstep: Lockstep, plan: StepPlan) -> bool:
        """Share rank 0's plan; False when the ranks can no longer exchange one (the lockstep has said so)."""
        try:
            lockstep.share(plan)
        except RuntimeError:
            return False
        return True

    def _run_plan(
        self, decoder: Decoder, plan: StepPlan, jobs: list[Job], checkpoints: list[tuple[list[int], Future[bool]]]
    ) -> None:
        """One step, the same on every rank: checkpoints, the jobs that join, the stops, then the batch's step."""
        self._now = plan.now
        self._run_checkpoints(checkpoints)
        for job in jobs:
            self._jobs[job.number] = job
        self._join(decoder, jobs)
        for number, reason in plan.stops.items():
            if number in self._jobs:
                self._jobs[number].decided_stop = reason
        if decoder.active:
            self._step(decoder)
        running = {number: job for number, job in self._jobs.items() if not job.done}
        if len(running) < len(self._jobs) and self._lockstep is not None:
            self._lockstep.started()
        self._jobs = running
        if plan.stopping:
            decoder.fail_all(ModelUnloadedError(self.loaded.name))

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

    def _wait_for_work(self, decoder: Decoder, heartbeat: float | None = None) -> bool:
        """Block until there is something to do (or ``heartbeat`` seconds pass); False when stopping and idle."""
        deadline = None if heartbeat is None else time.monotonic() + heartbeat
        with self._condition:
            while not (self._waiting or self._checkpoints or self._tasks or decoder.active or self._stopping):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return True
                self._condition.wait(left)
            if (self._waiting and not decoder.active and not self._checkpoints and not self._stopping
                    and self._more_coming()):  # fmt: skip
                # An idle batch gathers a burst; it looks again every few ms, since the request that
                # seemed on its way may be one that just finished (still sending its last bytes).
                gathered = time.perf_counter() - self._waiting[0].enqueued
                self._condition.wait(min(GATHER_POLL_SECONDS, max(0.0, GATHER_SECONDS - gathered)))
            return not (self._stopping and not decoder.active and not self._checkpoints)

    def _run_tasks(self) -> None:
        with self._condition:
            tasks = list(self._tasks)
            self._tasks.clear()
        for task, future in tasks:
            try:
                future.set_result(task())
            except Exception as error:  # noqa: BLE001 - handed to the caller, which raises it
                future.set_exception(error)

    def _take_checkpoints(self) -> list[tuple[list[int], Future[bool]]]:
        with self._condition:
            checkpoints = list(self._checkpoints)
            self._checkpoints.clear()
        return checkpoints

    def _run_checkpoints(self, checkpoints: list[tuple[list[int], Future[bool]]]) -> None:
        for tokens, future in checkpoints:
            try:
                future.set_result(self._prefill_checkpoint(tokens))
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

    def _choose(self, decoder: Decoder) -> list[Job]:
        """The waiting jobs that join now, in arrival order, while there is room in the batch and the budget.

        Decided here, run by ``_join`` (in lockstep, by every rank from the plan).
        """
        with self._condition:
            if not self._waiting or not self._should_admit(decoder):
                return []
        chosen: list[Job] = []
        lengths = decoder.final_lengths()
        computing = decoder.pending_prefixes()
        while True:
            with self._condition:
                if not self._waiting or self._stopping or decoder.active + len(chosen) >= self.max_batch:
                    break
                index = self._next_admissible(computing)
                if index is None:
                    break  # everything that waits shares a prefix that is being computed
                job = self._waiting[index]
                if not self.budget.fits([*lengths, job.final_length]):
                    if decoder.active or chosen:
                        break  # it waits until running sequences leave
                    del self._waiting[index]
                    job.deliver(KVBudgetError(self._too_large(job)))
                    self._flush()
                    continue
                del self._waiting[index]
            if self._lockstep is not None and (stop := job.wanted_stop()) in ("cancelled", "timeout"):
                job.decided_stop = stop  # it never joins: rank 0 ends it alone
                ActiveSequence(job, self.prompt_cache, self.tokenizer).finish(job.stop_reason(), None, None)
                continue
            self._numbered += 1
            job.number = self._numbered
            lengths = [*lengths, job.final_length]
            if job.prefix_key is not None:
                computing = computing | {job.prefix_key}
            chosen.append(job)
        if chosen:
            self._last_join = time.perf_counter()
        return chosen

    def _join(self, decoder: Decoder, jobs: list[Job]) -> None:
        """Insert the chosen jobs, each after making room in the prompt cache for the batch it joins."""
        for job in jobs:
            lengths = [*decoder.final_lengths(), job.final_length]
            self.prompt_cache.trim_to(self.budget.total_bytes - self.budget.batch_bytes(lengths))
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
