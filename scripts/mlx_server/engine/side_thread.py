"""Work done a slice at a time between decode steps, on a thread of its own, in turns with the worker.

mlx-vlm builds a vision tower's graph in one call (``get_input_embeddings``):
~20 ms of Python for the tiny Qwen2.5-VL's screenshot here, several times
that for a real tower, too long for one unit between two decode steps.  Run
on a thread of its own, the call stops part-way wherever it calls
``Turn.pause`` once its time is up, and goes on at the next step.  The two
threads take turns and never run at once (the worker waits while the side
thread has its turn), so nothing in MLX or the model is touched by both at
the same time: a coroutine whose stack is a thread's.

MLX keeps a stream per thread, and an array is evaluated on the thread whose
stream built it: work on the side thread evaluates what it builds (an
evaluated array can be read anywhere).  A thread that has used MLX keeps its
stream, and MLX's thread behind it, until the process ends, so side threads
are kept and reused rather than one made per image.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

__all__ = ["SideThread", "Turn", "TurnedWork", "WorkAbandonedError"]

T = TypeVar("T")


class WorkAbandonedError(BaseException):
    """Raised at a paused work's ``pause`` when its caller has let it go: the work unwinds (its ``with`` blocks
    restore what they changed) and ends."""


class Turn:
    """The time a work has before it pauses.  As made here, a turn without end: ``pause`` never stops (what a
    work run on the caller's own thread gets)."""

    def __init__(self) -> None:
        self.deadline = math.inf

    @property
    def unlimited(self) -> bool:
        return self.deadline == math.inf

    def pause(self, expected: float = 0.0) -> None:
        """A point where the work may stop: it does if its next part (``expected`` seconds) would end past the
        turn's deadline, until the caller resumes it."""


class TurnedWork(Turn, Generic[T]):
    """One work on a side thread: ``resume(seconds)`` gives it a turn, ``result()`` is what it returned."""

    def __init__(self, work: Callable[[Turn], T], side: SideThread) -> None:
        super().__init__()
        self._work, self._side = work, side
        self._turn, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._started = self.finished = self._abandoned = False
        self._result: T | None = None
        self._error: BaseException | None = None

    def pause(self, expected: float = 0.0) -> None:
        if time.perf_counter() + expected < self.deadline:
            return
        self._back.release()
        self._turn.acquire()
        if self._abandoned:
            raise WorkAbandonedError

    def resume(self, seconds: float) -> bool:
        """Run the work (on the side thread; this thread waits) until it pauses with ``seconds`` passed or ends.
        Returns whether it has ended; re-raises what it raised."""
        if not self.finished:
            self.deadline = time.perf_counter() + seconds
            if not self._started:
                self._started = True
                self._side.hand_over(self)
            self._turn.release()
            self._back.acquire()
        if self._error is not None:
            raise self._error
        return self.finished

    def result(self) -> T:
        if not self.finished or self._error is not None:
            raise RuntimeError("the work has not returned")
        return self._result  # type: ignore[return-value]

    def abandon(self) -> None:
        """Let the work go: a paused one unwinds on its thread (``WorkAbandonedError``) before this returns."""
        if self._started and not self.finished:
            self._abandoned = True
            self._turn.release()
            self._back.acquire()
        self.finished = True

    def run(self) -> None:
        """The work, on the side thread, from its first turn; its caller gets the turn back when it ends."""
        self._turn.acquire()
        try:
            if not self._abandoned:
                self._result = self._work(self)
        except WorkAbandonedError:
            pass
        except Exception as error:  # noqa: BLE001 - the caller's to handle: resume() raises it there
            self._error = error
        finally:
            self.finished = True
            self._back.release()


class SideThread:
    """Runs one ``TurnedWork`` at a time, in turns with the thread that resumes it.

    The thread under it is taken from those idle when a work first needs
    it and given back at ``close`` (a thread that used MLX is never ended:
    MLX aborts the process at exit when one has).
    """

    def __init__(self) -> None:
        self._runner: _Runner | None = None
        self._current: TurnedWork[Any] | None = None

    def begin(self, work: Callable[[Turn], T]) -> TurnedWork[T]:
        """A work to resume a turn at a time; one left unfinished before is abandoned first."""
        if self._current is not None:
            self._current.abandon()
        self._current = turned = TurnedWork(work, self)
        return turned

    def hand_over(self, work: TurnedWork[Any]) -> None:
        if self._runner is None:
            self._runner = _Runner.take()
        self._runner.works.put(work)

    def close(self) -> None:
        """Abandon the current work; the thread goes back to the idle ones."""
        if self._current is not None:
            self._current.abandon()
            self._current = None
        if self._runner is not None:
            _Runner.give_back(self._runner)
            self._runner = None


class _Runner:
    """A daemon thread running the works handed to it, one after another."""

    _idle: ClassVar[list[_Runner]] = []
    _idle_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.works: queue.SimpleQueue[TurnedWork[Any]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="side-thread", daemon=True).start()

    @classmethod
    def take(cls) -> _Runner:
        with cls._idle_lock:
            return cls._idle.pop() if cls._idle else cls()

    @classmethod
    def give_back(cls, runner: _Runner) -> None:
        with cls._idle_lock:
            cls._idle.append(runner)

    def _serve(self) -> None:
        while True:
            self.works.get().run()
