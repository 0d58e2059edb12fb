"""The engine's core: one step plan run, the same way on every rank.

``run`` sets the step's clock, prefills the plan's checkpoints, lets the
plan's jobs join the batch (each after making room in the prompt cache for
the batch it joins), marks the stops the plan decided, and steps the batch.
It never decides anything that depends on a client or a clock of its own
(that is the scheduler's, in the plan), so ranks that run the same plans
stay in step.

A failure never ends the worker silently: a job whose admission raises gets
the error (its client a 500, and a debug file from the chat core), a step
that raises fails the sequences it held and the batch starts over empty;
either way the next request is served.  What the core counts (steps,
tokens, the batch's KV bytes, speculation) is read by ``stats`` under a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import mlx.core as mx

from mlx_server.engine.kv_budget import KVBudget
from mlx_server.engine.plans import Checkpoint, StepPlan
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.scheduler import BatchView
from mlx_server.engine.sequence import Job
from mlx_server.vocabulary import ModelUnloadedError

__all__ = ["Decoder", "EngineCore", "StepClock"]

logger = logging.getLogger("mlx")


class Decoder(BatchView, Protocol):
    """A batch of sequences (``batch_decoding``, or one at a time: ``sequential_decoding``)."""

    def kv_bytes(self) -> int: ...
    def speculation_totals(self) -> tuple[int, int]: ...
    def admit(self, job: Job) -> None: ...
    def step(self) -> int: ...
    def fail_all(self, error: BaseException) -> None: ...
    def close(self) -> None: ...


class StepClock:
    """The time of the step being run (the plan's): what the prompt cache reads, on every rank alike."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class EngineCore:
    """Runs step plans over a decoder (worker thread only; ``stats`` from any thread)."""

    def __init__(
        self,
        decoder: Decoder,
        prompt_cache: KVPromptCache,
        budget: KVBudget,
        clock: StepClock,
        model: Any,
        prefill_step: int,
        model_name: str,
    ) -> None:
        self.decoder = decoder
        self._prompt_cache = prompt_cache
        self._budget = budget
        self._clock = clock
        self._model = model
        self._prefill_step = prefill_step
        self._model_name = model_name
        self._jobs: dict[int, Job] = {}  # admitted and not yet done, by number
        self._lock = threading.Lock()
        self.steps = self.generated = self.running_count = self.active_bytes = 0
        self.drafted = self.accepted = 0
        self.step_observers: list[Callable[[int], None]] = []

    @property
    def batch(self) -> BatchView:
        return self.decoder

    def running(self) -> list[Job]:
        return list(self._jobs.values())

    def run(self, plan: StepPlan) -> list[int]:
        """Run one plan; returns the numbers of the jobs that ended in it."""
        self._clock.now = plan.now
        for work, future in plan.tasks:
            try:
                future.set_result(work())
            except Exception as error:  # noqa: BLE001 - handed to the caller, which raises it
                future.set_exception(error)
        for checkpoint in plan.checkpoints:
            self._prefill_checkpoint(checkpoint)
        for job in plan.admitted:
            self._join(job)
        for number, reason in plan.stops.items():
            if number in self._jobs:
                self._jobs[number].stop = reason
        if self.decoder.active:
            self._step()
        if plan.last:
            self.decoder.fail_all(ModelUnloadedError(self._model_name))
        ended = [number for number, job in self._jobs.items() if job.state == "done"]
        for number in ended:
            del self._jobs[number]
        with self._lock:
            self.running_count = self.decoder.active
        return ended

    def fail_all(self, error: BaseException) -> None:
        """Something outside a job's own work failed: what the batch held gets the error; it starts over empty."""
        _report(error, "the engine's step")
        self.decoder.fail_all(error)
        for job in self._jobs.values():
            if job.state != "done":
                job.state = "done"
                job.deliver(error)
        self._jobs.clear()
        with self._lock:
            self.running_count = 0

    def _join(self, job: Job) -> None:
        """Make room in the prompt cache for the batch with ``job``, then let it join (or end, if it must)."""
        self._jobs[job.number] = job
        lengths = [*self.decoder.final_lengths(), job.final_length]
        self._prompt_cache.trim_to(self._budget.total_bytes - self._budget.batch_bytes(lengths))
        try:
            self.decoder.admit(job)  # a job the plan already stopped finishes here without joining
        except Exception as error:  # noqa: BLE001 - this request fails; the batch goes on
            _report(error, "admitting a request")
            if job.state != "done":
                job.state = "done"
                job.deliver(error)
        if job.state == "waiting":
            job.state = "running"

    def _step(self) -> None:
        batch = self.decoder.active
        try:
            generated = self.decoder.step()
        except Exception as error:  # noqa: BLE001 - the sequences it held fail; the next request is served
            _report(error, "a generation step")
            self.decoder.fail_all(error)
            generated = 0
        self._prompt_cache.trim_to(self._budget.total_bytes - self._budget.batch_bytes(self.decoder.final_lengths()))
        with self._lock:
            self.steps += 1
            self.generated += generated
            self.running_count = self.decoder.active
            self.active_bytes = self.decoder.kv_bytes()
            self.drafted, self.accepted = self.decoder.speculation_totals()
        for observer in self.step_observers:
            observer(batch)

    def _prefill_checkpoint(self, checkpoint: Checkpoint) -> None:
        try:
            kept = self._checkpoint(checkpoint.tokens)
        except Exception as error:  # noqa: BLE001 - handed to the caller, which raises it
            if checkpoint.future is not None:
                checkpoint.future.set_exception(error)
            return
        if checkpoint.future is not None:
            checkpoint.future.set_result(kept)

    def _checkpoint(self, tokens: list[int]) -> bool:
        if self._prompt_cache.has_checkpoint(tokens):
            return False
        cache = self._prompt_cache.new_cache()
        for start in range(0, len(tokens), self._prefill_step):
            self._model(mx.array(tokens[start : start + self._prefill_step])[None], cache=cache)
            mx.eval([layer.state for layer in cache])
        return self._prompt_cache.add_checkpoint(cache, tokens, copy=False)


def _report(error: BaseException, during: str) -> None:
    """An ERROR line with the traceback (each request it failed writes its own debug file, in the chat core)."""
    logger.error("The engine failed during %s: %s: %s", during, type(error).__name__, error, exc_info=error)
