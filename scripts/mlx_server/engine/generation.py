"""Generation: one worker thread owns the model and runs step plans over one batch; requests reach it here.

The engine is three parts with one owner each: the ``Scheduler`` (requests
waiting, admission, stops; what only this process knows), the
``EngineCore`` (a plan run over the batch, the same on every rank), and the
plans between them (``plans``: this process's own, or shared by rank 0 of a
distributed model, or received by the other ranks).  The worker's loop is
the same on every path: the next plan, run.  With ``--kv-bits`` the KV cache
is quantized and requests decode one at a time (``sequential_decoding``);
otherwise they join between decode steps, are prefilled in chunks
interleaved with the others' decoding, and leave when done, cancelled or out
of time (``batch_decoding``).

What callers use is small: ``stream`` (submit a request and read its
events), ``abort``, ``stats`` and the lifecycle.  Each token's text is handed
to its request's event loop once per step, for the whole batch.  A worker
that cannot go on (its loop failed, or a distributed rank stopped) says why
in ``failure``, and every request then gets ``ModelUnavailableError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_server.engine.batch_decoding import BatchDecoder
from mlx_server.engine.cache_report import describe_entries
from mlx_server.engine.constrained import GrammarTokenizer
from mlx_server.engine.core import Decoder, EngineCore, StepClock
from mlx_server.engine.kv_budget import KV_STEP, KVBudget
from mlx_server.engine.lockstep import Lockstep
from mlx_server.engine.outbox import Outbox
from mlx_server.engine.plans import FollowerPlans, LeaderPlans, LocalPlans
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.scheduler import RequestSignals, Scheduler
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
    ModelUnavailableError,
    ModelUnloadedError,
    PromptCacheStats,
    Sampling,
    SpeculativeMode,
    Tokenizer,
)

__all__ = ["EngineOptions", "GenerationEngine", "prefill_step"]

logger = logging.getLogger("mlx")
Result = TypeVar("Result")
GREEDY = Sampling(temperature=0.0).over(PLAIN_SAMPLING)
DRAIN_POLL_SECONDS = 0.05
#: Failures in a row outside any request's own work after which the worker gives up (the model is unavailable).
FAILURES_BEFORE_GIVING_UP = 3


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


def prefill_step() -> int:
    """Prompt tokens per model call during prefill: mlx-lm's 2048 on a GPU, 256 on CPU.

    Measured here (SmolLM2-135M, 2 cores, OpenBLAS): prefilling 2,048 tokens
    took 15.3 s in steps of 256 and 23.5 s in one step; CPU attention over
    large blocks is memory-bound.  A step is also the longest a running
    stream can stall while another request's prompt is prefilled.
    """
    return 2048 if mx.default_device().type == mx.DeviceType.gpu else 256


class GenerationEngine:
    """Owns the model; runs step plans on one worker thread (see the module's docstring)."""

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
        self.grammar_tokenizer = GrammarTokenizer.of(loaded.tokenizer)
        self._prefill_step = prefill_step()
        self._clock = StepClock()
        prompt_cache.use_clock(self._clock)
        self._scheduler = Scheduler(self.max_batch, self.options.prefill_batch, prompt_cache, loaded.tokenizer)
        self._lock = threading.Lock()
        self._outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}
        self._signals: dict[str, RequestSignals] = {}  # requests being read, by id (for abort)
        self._failure: str | None = None
        self._core: EngineCore | None = None
        self._ready: Future[KVBudget] = Future()
        self._thread = threading.Thread(target=self._work, name="mlx-generation", daemon=True)
        self._thread.start()
        self.budget: KVBudget = self._ready.result()

    # -- what callers ask --------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return cast(Tokenizer, self.loaded.tokenizer)  # mlx-lm's wrapper passes most of it on through __getattr__

    @property
    def context_length(self) -> int:
        """The longest a prompt plus its completion may be: the model's context, or less if the KV budget says so."""
        return min(self.loaded.context_length, self.budget.max_sequence_tokens)

    @property
    def model_info(self) -> dict[str, Any]:
        return self.loaded.describe()

    @property
    def failure(self) -> str | None:
        """Why the model can no longer run (its worker gave up, or a distributed rank stopped), or None."""
        with self._lock:
            return self._failure

    def cache_stats(self) -> PromptCacheStats:
        return self.prompt_cache.stats()

    def cache_entries(self) -> list[dict[str, Any]]:
        return describe_entries(self.prompt_cache)

    def stats(self) -> EngineStats:
        core = self._core
        assert core is not None, "the worker builds its core before the constructor returns"
        with core._lock:
            return EngineStats(
                waiting=self._scheduler.waiting,
                running=core.running_count,
                max_batch=self.max_batch,
                decode_steps=core.steps,
                generated_tokens=core.generated,
                active_kv_bytes=core.active_bytes,
                kv_budget_bytes=self.budget.total_bytes,
                kv_bytes_per_token=self.budget.bytes_per_token,
                drafted_tokens=core.drafted,
                accepted_tokens=core.accepted,
            )

    def count_arrivals(self, in_flight: Callable[[], int]) -> None:
        """Read the requests the server has accepted (``in_flight()``), to start a lone request at once."""
        self._scheduler.count_arrivals(in_flight)

    def observe_steps(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(batch size)`` after every decode step (from the worker thread)."""
        assert self._core is not None
        self._core.step_observers.append(observer)

    # -- requests ------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        """``PromptAdmitted`` when the request joins the batch, text as it is generated, then ``GenerationFinished``.

        Leaving the iteration early (a client that disconnected) cancels the
        request: it leaves the batch at the next step.  KVBudgetError when it
        cannot fit the KV budget even alone, GrammarError when its grammar
        cannot run, ModelUnavailableError when the model can no longer run.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Delivery] = asyncio.Queue()
        enqueued = time.perf_counter()
        outbox = self._outbox_for(loop)
        signals = RequestSignals(deadline=enqueued + request.timeout if request.timeout else None)
        job = Job(request, lambda event: outbox.post(events, event), enqueued, contextvars.copy_context())
        self._submit(job, signals, outbox)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationFinished):
                    break
        finally:
            signals.cancelled.set()
            with self._lock:
                if self._signals.get(request.request_id) is signals:
                    del self._signals[request.request_id]
            self._scheduler.wake()

    def abort(self, request_id: str) -> None:
        """The reader of ``request_id`` has what it needs: its sequence leaves at the next step (finish ``stop``)."""
        with self._lock:
            signals = self._signals.get(request_id)
        if signals is not None:
            signals.satisfied.set()
            self._scheduler.wake()

    async def complete(self, request: GenerationRequest) -> tuple[str, GenerationStats]:
        """The whole text and its stats, for in-process callers (benchmarks, tests)."""
        parts: list[str] = []
        async for event in self.stream(request):
            if isinstance(event, GeneratedText):
                parts.append(event.text)
            elif isinstance(event, GenerationFinished):
                return "".join(parts), event.stats
        raise AssertionError("the stream ends with GenerationFinished or raises")

    def _outbox_for(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        with self._lock:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = Outbox(loop)
            return outbox

    def _submit(self, job: Job, signals: RequestSignals, outbox: Outbox | None) -> None:
        with self._lock:
            failure = self._failure
            if failure is None and job.request.request_id:
                self._signals[job.request.request_id] = signals
        if failure is not None:
            job.deliver(ModelUnavailableError(failure))
        elif self._scheduler.stopping:
            job.deliver(ModelUnloadedError(self.loaded.name))
        else:
            self._scheduler.submit(job, signals)
            return
        if outbox is not None:
            outbox.flush()  # the worker will not: hand the refusal over at once

    # -- lifecycle ---------------------------------------------------------------

    def warm_up(self) -> float:
        """Run one short generation, so that no request pays a one-time set-up; returns the milliseconds it took."""
        started = time.perf_counter()
        prompt = list(self.tokenizer.encode("Hello", add_special_tokens=False)) or [0]
        finished = threading.Event()
        request = GenerationRequest(prompt, max_tokens=2, sampling=GREEDY, use_cache=False)

        def deliver(event: Delivery) -> None:
            if isinstance(event, (GenerationFinished, BaseException)):
                finished.set()

        self._submit(Job(request, deliver, started), RequestSignals(), None)
        finished.wait()
        return (time.perf_counter() - started) * 1000

    def prefill_checkpoint(self, tokens: list[int]) -> bool:
        """Compute the KV state of ``tokens`` and pin it as a checkpoint (the --warm-prompt path)."""
        return self._scheduler.checkpoint(tokens).result()

    def on_worker(self, work: Callable[[], Result]) -> Result:
        """Run ``work`` on the worker thread between two steps (one process only: tools, and tests that read KV)."""
        if self._lockstep is not None:
            raise RuntimeError("a distributed model's ranks run only step plans")
        result: Result = self._scheduler.task(work).result()
        return result

    def wait_until_stopped(self) -> None:
        """Block until the worker ends (a following rank: when rank 0 stops serving)."""
        self._thread.join()

    def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Stop the worker, after at most ``drain_seconds`` for what runs and waits to finish.

        Whatever is still running or waiting then ends with ModelUnloadedError
        (its client gets an error response or an in-stream error event), and so
        does any request that arrives later.
        """
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and (self._scheduler.waiting or self.stats().running):
            time.sleep(DRAIN_POLL_SECONDS)
        self._scheduler.stop()
        self._thread.join(timeout=60)

    def abandon(self, reason: str) -> None:
        """The model can no longer run (a distributed rank stopped): fail what waits and runs, and what comes.

        Called from outside the worker thread, which may be stuck in a collective.
        """
        error = ModelUnavailableError(f"model {self.loaded.name!r} is unavailable: {reason}")
        with self._lock:
            self._failure = error.message
        core = self._core
        pending = [*self._scheduler.drain_waiting(), *(core.running() if core is not None else [])]
        for job in pending:
            if job.state != "done":
                job.state = "done"
                job.deliver(error)
        self._flush()

    # -- the worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        try:
            with contextlib.suppress(GrammarError):  # logged; constrained requests then get a clear 400
                self.grammar_tokenizer.get()  # built before the first step, not inside one (every rank alike)
            budget = self._agreed_budget()
            core = EngineCore(self._decoder(), self.prompt_cache, budget, self._clock, self.loaded.model,
                              self._prefill_step, self.loaded.name)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - reported to the constructor, which raises it
            self._ready.set_exception(error)
            return
        self._core = core
        self._scheduler.budget = budget
        self._ready.set_result(budget)
        lockstep = self._lockstep
        if lockstep is None:
            plans: LocalPlans | FollowerPlans = LocalPlans(self._scheduler, core)
        elif lockstep.leader:
            plans = LeaderPlans(self._scheduler, core, lockstep)
        else:
            logger.info("%s follows rank 0's steps", lockstep.run.describe())
            plans = FollowerPlans(core, lockstep)
        try:
            self._loop(plans, core)
        finally:
            for job in self._scheduler.drain_waiting():
                job.deliver(ModelUnloadedError(self.loaded.name))
            self._flush()
            core.decoder.close()
            if lockstep is not None and not lockstep.leader:
                logger.info("%s: rank 0 stopped serving", lockstep.run.describe())

    def _loop(self, plans: LocalPlans | FollowerPlans, core: EngineCore) -> None:
        """The next plan, run, until serving ends; a failure outside any request's own work fails what the batch
        held and the loop goes on (one process), or ends it (the ranks can no longer be trusted to agree)."""
        failures = 0
        while True:
            try:
                going_on = plans.next_step()
                failures = 0
            except Exception as error:  # noqa: BLE001 - every request it held hears of it; the next is served
                failures += 1
                core.fail_all(error)
                if self._lockstep is not None or failures >= FAILURES_BEFORE_GIVING_UP:
                    self._give_up(f"its worker failed: {type(error).__name__}: {error}")
                    return
                going_on = True
            self._flush()
            if not going_on:
                return

    def _give_up(self, reason: str) -> None:
        logger.error("Model %s can no longer generate (%s); requests get 503 until it is reloaded",
                     self.loaded.name, reason)  # fmt: skip
        if self._lockstep is not None:
            self._lockstep.fail(reason)
        self.abandon(reason)

    def _agreed_budget(self) -> KVBudget:
        """The KV budget; in lockstep every rank takes rank 0's figures and random seed, and decides by tokens."""
        bytes_per_token = self._bytes_per_token()
        if self._lockstep is None:
            return KVBudget(self.options.kv_budget_bytes, bytes_per_token)
        lockstep = self._lockstep
        bytes_per_token = lockstep.agree(bytes_per_token)
        total = lockstep.agree(self.options.kv_budget_bytes)
        self.prompt_cache.max_bytes = lockstep.agree(self.prompt_cache.max_bytes)
        self.prompt_cache.count_in_tokens(bytes_per_token)
        mx.random.seed(lockstep.agree(int(time.time_ns() % 2**31)))
        return KVBudget(total, bytes_per_token)

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
        """KV bytes one token takes in this model's cache, quantized if asked: a plain ``KVCache`` holds a whole step
        from its first token, so one token measures it (not a 1.7 s pass); other caches get a step of tokens."""
        cache = make_prompt_cache(self.loaded.model)
        plain = all(type(layer) is KVCache and layer.step == KV_STEP for layer in cache)
        self.loaded.model(mx.zeros((1, 1 if plain else KV_STEP), dtype=mx.int32), cache=cache)
        if self.options.kv_bits:
            cache = [layer.to_quantized(group_size=KV_GROUP_SIZE, bits=self.options.kv_bits) for layer in cache]
        mx.eval([layer.state for layer in cache])
        return max(1, sum(int(layer.nbytes) for layer in cache) // KV_STEP)

    def _flush(self) -> None:
        with self._lock:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.flush()
