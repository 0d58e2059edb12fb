"""setup_logger(): the guide's format, idempotent, polite to other handlers, private rotating files."""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import utils_logging
from utils_logging import setup_logger

from .helpers import LINE, stderr_lines


@pytest.fixture
def logger_name() -> Iterator[str]:
    """A fresh logger name; its handlers are closed afterwards."""
    name = f"test.{uuid.uuid4().hex[:8]}"
    yield name
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


@pytest.fixture
def root_capture() -> Iterator[io.StringIO]:
    """A handler on the root logger, as basicConfig or uvicorn would add."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


class TestFormat:
    def test_default_line_format(self, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Lines look like ``[2025-10-28 22:46:27] [mlx] INFO: message``."""
        setup_logger(logger_name).info("Processing chat request")
        (line,) = stderr_lines(capsys)
        match = LINE.match(line)
        assert match is not None
        assert match.group(2, 3, 4) == (logger_name, "INFO", "Processing chat request")

    def test_custom_format_string(self, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
        """format_string replaces the default format."""
        setup_logger(logger_name, format_string="%(levelname)s|%(name)s|%(message)s").warning("careful")
        assert stderr_lines(capsys) == [f"WARNING|{logger_name}|careful"]

    def test_level_filters(self, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
        """The level argument sets the logger's threshold."""
        logger = setup_logger(logger_name, level=logging.WARNING)
        logger.info("hidden")
        logger.warning("shown")
        assert [line.rsplit(": ", 1)[1] for line in stderr_lines(capsys)] == ["shown"]


class TestIdempotence:
    def test_second_call_adds_nothing(self, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Calling setup_logger twice prints each line once."""
        setup_logger(logger_name)
        logger = setup_logger(logger_name)
        logger.info("once")
        assert len(stderr_lines(capsys)) == 1
        assert len(logger.handlers) == 1

    def test_concurrent_calls_add_one_handler(self, logger_name: str) -> None:
        """Sixteen threads configuring the same logger leave one handler."""
        threads = [threading.Thread(target=setup_logger, args=(logger_name,)) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(logging.getLogger(logger_name).handlers) == 1

    def test_beside_root_configuration(
        self, logger_name: str, root_capture: io.StringIO, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A root handler (basicConfig, uvicorn) does not print our lines a second time."""
        setup_logger(logger_name).info("only once")
        assert len(stderr_lines(capsys)) == 1
        assert root_capture.getvalue() == ""

    def test_foreign_handlers_are_kept(self, logger_name: str) -> None:
        """Handlers someone else added stay in place."""
        logger = logging.getLogger(logger_name)
        foreign = logging.StreamHandler(io.StringIO())
        logger.addHandler(foreign)
        setup_logger(logger_name)
        setup_logger(logger_name)
        assert foreign in logger.handlers

    def test_foreign_console_handler_is_not_doubled(self, logger_name: str) -> None:
        """If the logger already prints to stderr through someone else's handler, none is added."""
        logger = logging.getLogger(logger_name)
        foreign = logging.StreamHandler(logging.sys.stderr)  # type: ignore[attr-defined]
        logger.addHandler(foreign)
        setup_logger(logger_name)
        assert logger.handlers == [foreign]


class TestLogFile:
    def test_file_is_private(self, logger_name: str, tmp_path: Path) -> None:
        """The log file is created with mode 0600 and receives the lines."""
        path = tmp_path / "server.log"
        setup_logger(logger_name, log_file=path).info("to the file")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().rstrip().endswith("INFO: to the file")

    def test_rotation_keeps_files_private_and_bounded(
        self, logger_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Rotated generations are 0600 and there are never more than the backup count."""
        monkeypatch.setattr(utils_logging, "LOG_FILE_MAX_BYTES", 2_000)
        path = tmp_path / "server.log"
        logger = setup_logger(logger_name, log_file=path)
        for index in range(500):
            logger.info("line %d of padding padding padding", index)
        files = sorted(tmp_path.iterdir())
        assert [file.name for file in files] == ["server.log", "server.log.1", "server.log.2", "server.log.3"]
        assert all(stat.S_IMODE(file.stat().st_mode) == 0o600 for file in files)
        assert all(file.stat().st_size <= 2_000 for file in files)

    def test_same_file_twice_is_one_handler(self, logger_name: str, tmp_path: Path) -> None:
        """Repeating the call with the same file does not write each line twice."""
        path = tmp_path / "server.log"
        setup_logger(logger_name, log_file=path)
        setup_logger(logger_name, log_file=str(path)).info("single")
        assert path.read_text().count("single") == 1

    def test_unwritable_file_warns_and_keeps_logging(
        self, logger_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A log file that cannot be opened costs a warning naming it, not an exception; stderr keeps the lines."""
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        logger = setup_logger(logger_name, log_file=blocker / "server.log")
        logger.info("still logging")
        lines = stderr_lines(capsys)
        assert any(
            "WARNING: cannot open log file" in line and str(blocker / "server.log") in line and "stderr only" in line
            for line in lines
        ), lines
        assert any(LINE.match(line) and line.endswith("INFO: still logging") for line in lines), lines

    def test_threads_never_tear_lines(self, logger_name: str, tmp_path: Path) -> None:
        """16 threads x 5,000 lines: every line arrives whole and in its thread's order."""
        path = tmp_path / "threads.log"
        logger = setup_logger(logger_name, log_file=path)
        logger.removeHandler(next(h for h in logger.handlers if isinstance(h, utils_logging._StderrHandler)))

        def write(thread: int) -> None:
            for index in range(5_000):
                logger.info("thread=%02d index=%04d payload=%s", thread, index, "x" * 40)

        threads = [threading.Thread(target=write, args=(number,)) for number in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pattern = re.compile(r"thread=(\d\d) index=(\d{4}) payload=x{40}$")
        seen: dict[int, list[int]] = {}
        lines = path.read_text().splitlines()
        for line in lines:
            match = LINE.match(line)
            assert match, line
            body = pattern.match(match.group(4))
            assert body, line
            seen.setdefault(int(body.group(1)), []).append(int(body.group(2)))
        assert len(lines) == 80_000
        assert all(indices == list(range(5_000)) for indices in seen.values())
        assert os.path.getsize(path) > 0
