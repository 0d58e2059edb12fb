"""A work on a side thread runs a turn at a time, in turns with its caller (``engine/side_thread.py``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from mlx_server.engine.side_thread import SideThread, Turn


@pytest.fixture
def side() -> Iterator[SideThread]:
    thread = SideThread()
    yield thread
    thread.close()


def stepping(log: list[str], steps: int) -> Callable[[Turn], int]:
    """A work that logs each step and may pause after each (every pause is due: a deadline of zero)."""

    def work(turn: Turn) -> int:
        for step in range(steps):
            log.append(f"work {step} on {threading.current_thread().name}")
            turn.pause()
        return steps

    return work


class TestTurns:
    def test_each_resume_runs_the_work_to_its_next_pause_and_the_last_returns_its_result(
        self, side: SideThread
    ) -> None:
        log: list[str] = []
        work = side.begin(stepping(log, 3))
        ends = []
        for turn in range(4):
            log.append(f"caller {turn}")
            ends.append(work.resume(0.0))
        assert ends == [False, False, False, True]
        assert [line.split(" on ")[0] for line in log] == [
            "caller 0", "work 0", "caller 1", "work 1", "caller 2", "work 2", "caller 3",
        ]  # fmt: skip
        assert all(not line.endswith("MainThread") for line in log if line.startswith("work"))
        assert work.result() == 3

    def test_a_turn_with_time_left_goes_on_past_its_pauses(self, side: SideThread) -> None:
        log: list[str] = []
        work = side.begin(stepping(log, 50))
        assert work.resume(3600.0)
        assert len(log) == 50

    def test_what_the_work_raises_is_raised_by_resume(self, side: SideThread) -> None:
        def failing(turn: Turn) -> None:
            turn.pause()
            raise ValueError("the image is unreadable")

        work = side.begin(failing)
        assert not work.resume(0.0)
        with pytest.raises(ValueError, match="unreadable"):
            work.resume(0.0)

    def test_a_turn_made_here_never_pauses(self) -> None:
        turn = Turn()
        turn.pause(expected=10**9)
        assert turn.unlimited


class TestLettingGo:
    def test_an_abandoned_work_unwinds_on_its_thread_before_abandon_returns(self, side: SideThread) -> None:
        unwound = threading.Event()

        def held(turn: Turn) -> None:
            try:
                while True:
                    turn.pause()
            finally:
                unwound.set()

        work = side.begin(held)
        assert not work.resume(0.0)
        work.abandon()
        assert unwound.is_set() and work.finished

    def test_a_new_work_abandons_the_one_left_unfinished(self, side: SideThread) -> None:
        log: list[str] = []
        first = side.begin(stepping(log, 5))
        first.resume(0.0)
        second = side.begin(stepping(log, 1))
        assert first.finished
        assert second.resume(0.0) is False and second.resume(0.0) is True
        assert len(log) == 2  # the first work's one step, then the second's

    def test_a_closed_side_threads_thread_serves_the_next_one(self) -> None:
        names: list[str] = []
        for _ in range(3):
            side = SideThread()
            work = side.begin(lambda turn: names.append(threading.current_thread().name))
            assert work.resume(0.0)
            side.close()
        assert len(set(names)) == 1
