"""Step plans, and where each step's plan comes from: this process, rank 0 sharing it, or rank 0's, received.

The engine's loop is the same on every path: take the next plan, run it
(``core``).  A ``StepPlan`` says everything that does not follow from the
batch itself: the clock the prompt cache reads, the jobs that join, the
running jobs that stop and why, the checkpoints to prefill, whether it is the
last.  Where it comes from is the only difference between one process and
several: ``LocalPlans`` asks the scheduler; ``LeaderPlans`` (rank 0) asks it
at least every ``HEARTBEAT_SECONDS`` and shares each plan with the other
ranks before running it; ``FollowerPlans`` runs rank 0's.  One process is the
distributed path with one rank and nothing to share.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mlx_server.engine.sequence import Job
from mlx_server.vocabulary import FinishReason

if TYPE_CHECKING:
    from mlx_server.engine.lockstep import Lockstep
    from mlx_server.engine.scheduler import BatchView, Scheduler

__all__ = ["HEARTBEAT_SECONDS", "Checkpoint", "FollowerPlans", "LeaderPlans", "LocalPlans", "PlanRunner", "StepPlan"]

HEARTBEAT_SECONDS = 1.0  # rank 0 shares a plan at least this often, an empty one when idle


@dataclass
class Checkpoint:
    """A stable prefix to prefill and pin; ``future`` (rank 0's) learns whether it was kept."""

    tokens: list[int]
    future: Future[bool] | None = None


@dataclass
class StepPlan:
    """What every rank does in the next step, as the scheduler (rank 0's) decided it.

    ``tasks`` are work for this process's worker between steps (tools and
    tests in one process); they are never shared.
    """

    now: float  # the scheduler's clock, which the prompt cache reads
    admitted: list[Job] = field(default_factory=list)  # in the order they join
    stops: dict[int, FinishReason] = field(default_factory=dict)  # running jobs that leave, and why
    checkpoints: list[Checkpoint] = field(default_factory=list)
    last: bool = False  # serving ends: nothing runs after this plan
    tasks: list[tuple[Callable[[], Any], Future[Any]]] = field(default_factory=list)


class PlanRunner(Protocol):
    """What runs a plan (the engine's core), and what a scheduler reads of it."""

    @property
    def batch(self) -> BatchView: ...

    def running(self) -> list[Job]: ...

    def run(self, plan: StepPlan) -> list[int]:
        """Run the plan; returns the numbers of the jobs that ended in it."""
        ...


class LocalPlans:
    """One process: the scheduler's plan, when there is something to do."""

    def __init__(self, scheduler: Scheduler, core: PlanRunner) -> None:
        self._scheduler = scheduler
        self._core = core

    def next_step(self) -> bool:
        """Plan and run one step; False when serving has ended."""
        core = self._core
        if not self._scheduler.wait_for_work(core.batch):
            return False
        plan = self._scheduler.plan(core.batch, core.running())
        self._ran(plan)
        return not plan.last

    def _ran(self, plan: StepPlan) -> None:
        for number in self._core.run(plan):
            self._scheduler.done(number)


class LeaderPlans(LocalPlans):
    """Rank 0: a plan at least every heartbeat, shared with the other ranks, then run as they run it."""

    def __init__(self, scheduler: Scheduler, core: PlanRunner, lockstep: Lockstep) -> None:
        super().__init__(scheduler, core)
        self._lockstep = lockstep

    def next_step(self) -> bool:
        core = self._core
        self._scheduler.wait_for_work(core.batch, HEARTBEAT_SECONDS)
        plan = self._scheduler.plan(core.batch, core.running())
        with self._lockstep.collective():
            try:
                self._lockstep.share(plan)
            except RuntimeError:
                return False  # the lockstep has said why; this process ends
            ended = self._core.run(plan)
        for number in ended:
            self._scheduler.done(number)
        if ended:
            self._lockstep.started()  # a request finished: the start-up's one-off work is behind every rank
        return not plan.last


class FollowerPlans:
    """Another rank: rank 0's plans, run as rank 0 runs them, until it says serving ends."""

    def __init__(self, core: PlanRunner, lockstep: Lockstep) -> None:
        self._core = core
        self._lockstep = lockstep

    def next_step(self) -> bool:
        with self._lockstep.collective():
            try:
                plan = self._lockstep.share(None)
            except RuntimeError:
                return False
            if self._core.run(plan):
                self._lockstep.started()
        return not plan.last
