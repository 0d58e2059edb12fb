"""The scheduler: the requests waiting, which of them join the batch, and which running ones stop, each step.

It is the one place that knows what only this process knows (rank 0's, in a
distributed model): its clients' requests, their disconnects, their
deadlines and readers that have what they need, and its clock.  Each step it
writes down what follows from them as a ``StepPlan``, which every rank runs
alike (``core``).  The rules for joining:

* a request joins while the batch has room (``max_batch``) and the KV budget
  can hold the batch with it; one that could never fit, even alone, is refused;
* joins are grouped (every join costs mlx-lm a prefill call and a copy of
  the batch's KV state, stalling the streams that decode): a batch with
  streams decoding takes newcomers at most every ``JOIN_INTERVAL_SECONDS``, as
  mlx_lm.server's time budget does; a batch that is only prefilling takes them
  at once; an idle one waits ``GATHER_SECONDS`` for requests that arrive
  together, or less when a prefill batch's worth waits or no accepted request
  is still on its way (a lone request starts at once);
* subagents that share a stable prefix another sequence is prefilling wait
  for its checkpoint instead of computing it again, and join as soon as it is
  kept.

A request that is cancelled or passes its deadline while it waits is ended
here, without joining.  State is shared with the threads that submit
requests under one condition variable, held briefly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlx_server.engine.kv_budget import KVBudget
from mlx_server.engine.plans import Checkpoint, StepPlan
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.sequence import ActiveSequence, Job
from mlx_server.vocabulary import FinishReason, KVBudgetError

__all__ = ["GATHER_SECONDS", "JOIN_INTERVAL_SECONDS", "BatchView", "RequestSignals", "Scheduler"]

JOIN_INTERVAL_SECONDS = 0.5  # a running batch takes newcomers at most this often (mlx_lm.server's time budget)
GATHER_SECONDS = 0.05  # an idle batch waits this long for requests that arrive together
GATHER_POLL_SECONDS = 0.005


class BatchView(Protocol):
    """What the scheduler reads of the batch (a decoder)."""

    @property
    def active(self) -> int: ...
    @property
    def decoding(self) -> int: ...
    def final_lengths(self) -> list[int]: ...
    def pending_prefixes(self) -> set[str]: ...


@dataclass
class RequestSignals:
    """What a request's client side says, seen only where its client is: it left, it has what it needs, its time."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    satisfied: threading.Event = field(default_factory=threading.Event)  # the reader has what it needs (abort)
    deadline: float | None = None  # time.perf_counter() after which it stops with "timeout"

    def wanted_stop(self) -> FinishReason | None:
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "timeout"
        if self.satisfied.is_set():
            return "stop"
        return None


class Scheduler:
    """Waiting requests, admission and stops; one plan per step (see the module's docstring)."""

    def __init__(self, max_batch: int, prefill_batch: int, prompt_cache: KVPromptCache, tokenizer: Any) -> None:
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch
        self.budget: KVBudget | None = None  # set once the worker has measured it
        self._prompt_cache = prompt_cache
        self._tokenizer = tokenizer
        self._condition = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._signals: dict[int, RequestSignals] = {}  # every job not yet done, by number
        self._held: set[int] = set()  # jobs that waited for another sequence to compute their stable prefix
        self._checkpoints: deque[Checkpoint] = deque()
        self._tasks: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._numbered = 0
        self._last_join = 0.0
        self._stopping = False
        self._in_flight: Callable[[], int] | None = None

    # -- from any thread ---------------------------------------------------------------------------------

    def submit(self, job: Job, signals: RequestSignals) -> None:
        """A request to schedule (numbered here); it waits until a plan lets it join."""
        with self._condition:
            self._numbered += 1
            job.number = self._numbered
            self._signals[job.number] = signals
            self._waiting.append(job)
            self._condition.notify_all()

    def checkpoint(self, tokens: list[int]) -> Future[bool]:
        """Prefill ``tokens`` and pin them as a checkpoint in the next step (the --warm-prompt path)."""
        future: Future[bool] = Future()
        with self._condition:
            self._checkpoints.append(Checkpoint(tokens, future))
            self._condition.notify_all()
        return future

    def task(self, work: Callable[[], Any]) -> Future[Any]:
        """Run ``work`` on the worker between two steps (one process only: tools and tests)."""
        future: Future[Any] = Future()
        with self._condition:
            self._tasks.append((work, future))
            self._condition.notify_all()
        return future

    def wake(self) -> None:
        """Something a plan would notice changed (a client left, a reader is satisfied)."""
        with self._condition:
            self._condition.notify_all()

    def stop(self) -> None:
        """Serving ends: what waits is ended, what runs is stopped, and the plan after that is the last."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def count_arrivals(self, in_flight: Callable[[], int]) -> None:
        """Read the requests the server has accepted (``in_flight()``), to start a lone request at once."""
        self._in_flight = in_flight

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    @property
    def stopping(self) -> bool:
        with self._condition:
            return self._stopping

    def done(self, number: int) -> None:
        """A job ended (its final event was delivered): its signals are forgotten."""
        with self._condition:
            self._signals.pop(number, None)
            self._held.discard(number)

    def drain_waiting(self) -> list[Job]:
        """Take every waiting job out (the engine stops: the caller ends them)."""
        with self._condition:
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in waiting:
                self._signals.pop(job.number, None)
            return waiting

    # -- on the worker -----------------------------------------------------------------------------------

    def wait_for_work(self, batch: BatchView, heartbeat: float | None = None) -> bool:
        """Block until there is something to plan (or ``heartbeat`` seconds pass); False when stopping and idle."""
        deadline = None if heartbeat is None else time.monotonic() + heartbeat
        with self._condition:
            while not (self._waiting or self._checkpoints or self._tasks or batch.active or self._stopping):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return True
                self._condition.wait(left)
            if (self._waiting and not batch.active and not self._checkpoints and not self._stopping
                    and self._more_coming(batch.active)):  # fmt: skip
                # An idle batch gathers a burst; it looks again every few ms, since the request that
                # seemed on its way may be one that just finished (still sending its last bytes).
                gathered = time.perf_counter() - self._waiting[0].enqueued
                self._condition.wait(min(GATHER_POLL_SECONDS, max(0.0, GATHER_SECONDS - gathered)))
            return not (self._stopping and not batch.active and not self._checkpoints and not self._tasks)

    def plan(self, batch: BatchView, running: list[Job]) -> StepPlan:
        """The next step: its clock, checkpoints, tasks, the jobs that join, the running jobs that stop."""
        now = time.monotonic()
        with self._condition:
            checkpoints = list(self._checkpoints)
            self._checkpoints.clear()
            tasks = list(self._tasks)
            self._tasks.clear()
            stopping = self._stopping
        self._end_the_impatient()
        admitted = [] if stopping else self._choose(batch)
        stops: dict[int, FinishReason] = {}
        with self._condition:
            for job in running:
                wanted = "cancelled" if stopping else self._wanted(job.number)
                if wanted is not None and job.stop is None:
                    stops[job.number] = wanted
        last = stopping and not batch.active and not admitted
        return StepPlan(now, admitted, stops, checkpoints, last, tasks)

    def _wanted(self, number: int) -> FinishReason | None:
        signals = self._signals.get(number)
        return signals.wanted_stop() if signals is not None else None

    def _end_the_impatient(self) -> None:
        """Waiting jobs whose client left or whose deadline passed end here, without joining."""
        with self._condition:
            ended = [(job, reason) for job in self._waiting
                     if (reason := self._wanted(job.number)) in ("cancelled", "timeout")]  # fmt: skip
            for job, _ in ended:
                self._waiting.remove(job)
                self._signals.pop(job.number, None)
        for job, reason in ended:
            ActiveSequence(job, self._prompt_cache, self._tokenizer).finish(reason, None, None)

    def _should_admit(self, batch: BatchView) -> bool:
        """Whether waiting jobs join now, or gather for one larger join (caller holds the lock)."""
        if not batch.active:
            waited = time.perf_counter() - self._waiting[0].enqueued
            full = len(self._waiting) >= self.prefill_batch
            return waited >= GATHER_SECONDS or full or not self._more_coming(batch.active)
        if not batch.decoding:
            return True
        computing = batch.pending_prefixes()
        if any(job.number in self._held and job.prefix_key not in computing for job in self._waiting):
            return True  # they came with the sequence whose prefix they waited for: they join it now
        return time.perf_counter() - self._last_join >= JOIN_INTERVAL_SECONDS

    def _more_coming(self, running: int) -> bool:
        """Whether requests the server accepted have yet to reach the engine (unknown: assume so)."""
        if self._in_flight is None:
            return True
        return self._in_flight() > len(self._waiting) + running

    def _choose(self, batch: BatchView) -> list[Job]:
        """The waiting jobs that join now, in arrival order, while there is room in the batch and the budget."""
        budget = self.budget
        assert budget is not None, "the worker measures the budget before its first plan"
        with self._condition:
            if not self._waiting or not self._should_admit(batch):
                return []
        chosen: list[Job] = []
        lengths = batch.final_lengths()
        computing = batch.pending_prefixes()
        refused: list[Job] = []
        with self._condition:
            while self._waiting and batch.active + len(chosen) < self.max_batch:
                index = self._next_admissible(computing)
                if index is None:
                    break  # everything that waits shares a prefix that is being computed
                job = self._waiting[index]
                if not budget.fits([*lengths, job.final_length]):
                    if batch.active or chosen:
                        break  # it waits until running sequences leave
                    del self._waiting[index]
                    self._signals.pop(job.number, None)
                    refused.append(job)
                    continue
                del self._waiting[index]
                lengths = [*lengths, job.final_length]
                if job.prefix_key is not None and self._prompt_cache.computes_prefix(
                    job.cache_prompt, job.stable_prefix
                ):
                    computing = computing | {job.prefix_key}
                chosen.append(job)
        for job in refused:
            job.deliver(KVBudgetError(self._too_large(job, budget)))
        if chosen:
            self._last_join = time.perf_counter()
        return chosen

    def _next_admissible(self, computing: set[str]) -> int | None:
        """The first waiting job that does not need a stable prefix another sequence is prefilling now.

        Subagents start together with the same system prompt and tools: one
        prefills it, the others wait until its checkpoint is pinned and start
        from there, instead of all computing the same thousands of tokens.
        (Caller holds the lock.)
        """
        for index, job in enumerate(self._waiting):
            if job.prefix_key is None or job.prefix_key not in computing:
                return index
            self._held.add(job.number)
        return None

    @staticmethod
    def _too_large(job: Job, budget: KVBudget) -> str:
        return (
            f"the request needs the KV state of {job.final_length} tokens, more than the "
            f"{budget.max_sequence_tokens} that fit the KV budget ({budget.total_bytes} bytes, --kv-budget)"
        )
