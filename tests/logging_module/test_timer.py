"""PerformanceTimer: checkpoints and totals as lines and as data, sync and async, never mixed up."""

from __future__ import annotations

import asyncio
import threading

import pytest

import utils_logging
from utils_logging import PerformanceTimer, timing_decorator

from .helpers import stderr_lines


def _bodies(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[1] for line in lines]


class TestContextManager:
    def test_checkpoints_and_total_are_logged(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At level 2 each checkpoint and the total are logged with two decimals."""
        utils_logging.set_debug_level(2)
        with PerformanceTimer("chat_completion") as timer:
            first = timer.checkpoint("request_parsed")
            second = timer.checkpoint("cache_check")
        bodies = _bodies(stderr_lines(capsys))
        assert bodies[0] == f"[Timer] chat_completion @ request_parsed: {first:.2f}ms"
        assert bodies[1] == f"[Timer] chat_completion @ cache_check: {second:.2f}ms"
        assert bodies[2] == f"[Timer] chat_completion completed in {timer.elapsed_ms:.2f}ms"
        assert 0 <= first <= second <= timer.elapsed_ms

    def test_silent_below_its_level(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A timer at log_level 2 prints nothing at level 1, but still measures."""
        utils_logging.set_debug_level(1)
        with PerformanceTimer("quiet") as timer:
            timer.checkpoint("step")
        assert stderr_lines(capsys) == []
        assert timer.checkpoints.keys() == {"step"}

    def test_timings_are_data(self) -> None:
        """elapsed_ms is frozen at exit; as_dict gives name, total and ordered checkpoints."""
        with PerformanceTimer("data") as timer:
            timer.checkpoint("a")
            timer.checkpoint("b")
        frozen = timer.elapsed_ms
        assert timer.elapsed_ms == frozen
        summary = timer.as_dict()
        assert summary["name"] == "data"
        assert list(summary["checkpoints"]) == ["a", "b"]  # type: ignore[call-overload]

    def test_exception_is_logged_and_reraised(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A failure logs ``failed after <ms>ms: <ExcType>`` at ERROR and propagates."""
        utils_logging.set_debug_level(1)
        with pytest.raises(KeyError), PerformanceTimer("lookup"):
            raise KeyError("missing")
        (line,) = stderr_lines(capsys)
        assert " ERROR: [Timer] lookup failed after " in line
        assert line.endswith("ms: KeyError")

    def test_async_context_manager(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``async with`` works the same way."""
        utils_logging.set_debug_level(2)

        async def run() -> float:
            async with PerformanceTimer("async_block") as timer:
                await asyncio.sleep(0)
                return timer.checkpoint("awaited")

        asyncio.run(run())
        bodies = _bodies(stderr_lines(capsys))
        assert bodies[0].startswith("[Timer] async_block @ awaited: ")
        assert bodies[1].startswith("[Timer] async_block completed in ")


class TestDecorator:
    def test_sync_function(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Decorating a function times every call and keeps its metadata."""
        utils_logging.set_debug_level(2)

        @PerformanceTimer("add")
        def add(a: int, b: int) -> int:
            """Adds."""
            return a + b

        assert add(2, 3) == 5
        assert add(1, 1) == 2
        assert add.__name__ == "add" and add.__doc__ == "Adds."
        assert [body.split(" in ")[0] for body in _bodies(stderr_lines(capsys))] == ["[Timer] add completed"] * 2

    def test_async_function(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Coroutine functions are awaited inside the timer."""
        utils_logging.set_debug_level(2)

        @timing_decorator()
        async def fetch() -> str:
            await asyncio.sleep(0)
            return "done"

        assert asyncio.run(fetch()) == "done"
        (body,) = _bodies(stderr_lines(capsys))
        assert body.startswith("[Timer] TestDecorator.test_async_function.<locals>.fetch completed in ")

    def test_decorated_failure_reraises(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The decorator re-raises like the context manager."""
        utils_logging.set_debug_level(2)

        @timing_decorator(log_level=3)
        def explode() -> None:
            raise ValueError("no")

        with pytest.raises(ValueError, match="no"):
            explode()
        assert _bodies(stderr_lines(capsys))[0].endswith("ms: ValueError")


class TestConcurrency:
    def test_threads_keep_their_own_checkpoints(self) -> None:
        """Timers in concurrent threads never see each other's checkpoints."""
        results: dict[int, list[str]] = {}
        barrier = threading.Barrier(8)

        def work(number: int) -> None:
            with PerformanceTimer(f"t{number}") as timer:
                barrier.wait()
                for step in range(200):
                    timer.checkpoint(f"{number}-{step}")
            results[number] = list(timer.checkpoints)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for number, labels in results.items():
            assert labels == [f"{number}-{step}" for step in range(200)]

    def test_one_decorator_many_tasks(self, capsys: pytest.CaptureFixture[str]) -> None:
        """One decorated coroutine run by 50 tasks at once logs 50 separate totals."""
        utils_logging.set_debug_level(2)

        @PerformanceTimer("task")
        async def step(number: int) -> int:
            await asyncio.sleep(0)
            return number

        async def main() -> list[int]:
            return await asyncio.gather(*(step(n) for n in range(50)))

        assert asyncio.run(main()) == list(range(50))
        assert len([line for line in stderr_lines(capsys) if "[Timer] task completed in" in line]) == 50
