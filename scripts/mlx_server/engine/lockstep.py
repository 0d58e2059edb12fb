"""Every rank runs the same steps: rank 0 decides what only it knows and shares it once per step.

A distributed model's ranks must run the same collectives in the same order
(every forward pass is one), or they wait on each other forever.  So the
engine on rank 0 decides, before each step, everything that depends on
something only it knows (``StepPlan``: the requests that join, the ones
that stop because a client left, a deadline passed or the reader has what it
needs, the clock the prompt cache reads, checkpoints to prefill, the end of
serving) and shares it with ``Lockstep.share``; everything else (batch
composition, prefill chunks, sampling and its random state, grammar masks,
speculation, prompt-cache lookups and evictions) follows from it the same
way on every rank.  Rank 0 sends a plan at least every ``HEARTBEAT_SECONDS``,
an empty one when idle.

A rank that dies or stops answering leaves the others inside a collective.
The watchdog sees a step (or, on a follower, the wait for rank 0's next
plan) outlast its patience (the timeout past twice the slowest step yet),
and ends this process: rank 0 first says why, answers 503 and fails what is
running (``on_failure``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_server.vocabulary import FinishReason, GenerationRequest

__all__ = [
    "EXIT_DISTRIBUTED_FAILURE",
    "HEARTBEAT_SECONDS",
    "START_UP_SECONDS",
    "DistributedRun",
    "Lockstep",
    "StepPlan",
]

logger = logging.getLogger("mlx")

HEARTBEAT_SECONDS = 1.0
EXIT_DISTRIBUTED_FAILURE = 3
FAILURE_GRACE_SECONDS = 2.0  # rank 0 answers the requests it fails before it exits
START_UP_SECONDS = 120.0  # the patience until the first request (the warm-up) has finished: first compiles, allocations


@dataclass(frozen=True)
class DistributedRun:
    """This process's place: its rank among ``size``, the group, and how the model is split (tensor or pipeline)."""

    group: Any
    rank: int
    size: int
    parallel: str

    @property
    def leader(self) -> bool:
        """Rank 0: it serves HTTP and decides every step; the others follow."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({self.parallel} parallel)"


@dataclass
class StepPlan:
    """What every rank does in the next step, as rank 0 decided it."""

    now: float  # rank 0's clock, which the prompt cache reads
    admitted: list[tuple[int, GenerationRequest]] = field(default_factory=list)  # in the order they join
    stops: dict[int, FinishReason] = field(default_factory=dict)  # running jobs that leave, and why
    checkpoints: list[list[int]] = field(default_factory=list)  # stable prefixes to prefill and pin
    stopping: bool = False  # serving ends: every rank stops after this plan


class Lockstep:
    """One rank's side of the step plans, and the watchdog over its collectives."""

    def __init__(self, run: DistributedRun, timeout: float, on_failure: Callable[[str], None] | None = None) -> None:
        self.run = run
        self._timeout = timeout
        self._on_failure = on_failure
        self._busy_since: float | None = None
        self._longest = 0.0  # the slowest step so far (seconds)
        self._started = False  # a request has finished on this rank: the start-up's one-off work is done
        self._failed = False
        self._watchdog = threading.Thread(target=self._watch, name="mlx-distributed-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def leader(self) -> bool:
        return self.run.leader

    def share(self, plan: StepPlan | None) -> StepPlan:
        """Rank 0 passes its plan, the others None; every rank gets rank 0's plan (two all_sums)."""
        try:
            if self.run.leader:
                assert plan is not None
                data = np.frombuffer(pickle.dumps(plan), dtype=np.uint8)
                mx.eval(mx.distributed.all_sum(mx.array([data.size], dtype=mx.int32), group=self.run.group))
                mx.eval(mx.distributed.all_sum(mx.array(data), group=self.run.group))
                return plan
            size = int(np.array(mx.distributed.all_sum(mx.array([0], dtype=mx.int32), group=self.run.group))[0])
            received = mx.distributed.all_sum(mx.zeros((size,), dtype=mx.uint8), group=self.run.group)
            shared: StepPlan = pickle.loads(np.array(received).tobytes())
            return shared
        except Exception as error:
            self.fail(f"the ranks stopped exchanging step plans ({type(error).__name__}: {error})")
            raise

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a start-up figure every rank must decide by)."""
        mine = value if self.run.leader else 0
        return int(np.array(mx.distributed.all_sum(mx.array([mine], dtype=mx.int64), group=self.run.group))[0])

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """A stretch of work the other ranks take part in: the watchdog times it."""
        started = self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None
            self._longest = max(self._longest, time.monotonic() - started)

    def started(self) -> None:
        """The first request finished (every rank sees it in the same step): from now on the timeout is the rule."""
        self._started = True

    @property
    def patience(self) -> float:
        """How long a step may take before the other ranks count as gone: the timeout past the slowest step yet.

        A prefill step of a large model on a slow machine may take longer than
        the timeout, and the first request's steps compile kernels and
        allocate (``START_UP_SECONDS`` at least); a rank that stopped answering
        takes far longer than either.
        """
        timeout = self._timeout if self._started else max(self._timeout, START_UP_SECONDS)
        return timeout + 2 * self._longest

    def fail(self, reason: str) -> None:
        """The ranks can no longer run in step: say so, let rank 0 answer what it holds, and end the process."""
        if self._failed:
            return
        self._failed = True
        role = "rank 0 stops serving" if self.run.leader else f"rank {self.run.rank} stops"
        logger.error("Distributed model (%s): %s; %s", self.run.describe(), reason, role)
        if self._on_failure is not None:
            with contextlib.suppress(Exception):
                self._on_failure(reason)
        threading.Timer(FAILURE_GRACE_SECONDS if self.run.leader else 0.0, _exit_now).start()

    def _watch(self) -> None:
        while not self._failed:
            time.sleep(0.25)
            started = self._busy_since
            if started is not None and time.monotonic() - started > self.patience:
                waited = time.monotonic() - started
                others = "rank 0" if not self.run.leader else "another rank"
                self.fail(f"no answer from {others} for {waited:.0f}s (--distributed-timeout {self._timeout:g}, "
                          f"past the slowest step yet)")  # fmt: skip


def _exit_now() -> None:
    logging.shutdown()
    os._exit(EXIT_DISTRIBUTED_FAILURE)
