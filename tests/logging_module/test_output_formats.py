"""JSON lines, request ids, colour, and the start-up banner."""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
from typing import Any

import pytest

import utils_logging
from utils_logging import debug, display_debug_startup, request_context, setup_logger

from .helpers import LINE, stderr_lines


def _use_format(monkeypatch: pytest.MonkeyPatch, log_format: str) -> None:
    monkeypatch.setenv("ANYCLAUDE_LOG_FORMAT", log_format)
    utils_logging.reload_from_environment()


class TestJsonLines:
    def test_debug_line_is_one_json_object(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """ANYCLAUDE_LOG_FORMAT=json: time, level, logger, message and data as structure."""
        _use_format(monkeypatch, "json")
        utils_logging.set_debug_level(2)
        debug(1, "Cache put", {"key": "abc", "size_kb": 1.2})
        (line,) = stderr_lines(capsys)
        entry: dict[str, Any] = json.loads(line)
        assert entry["level"] == "DEBUG" and entry["logger"] == "anyclaude"
        assert entry["message"] == "Cache put"
        assert entry["data"] == {"key": "abc", "size_kb": 1.2}
        assert datetime.datetime.fromisoformat(entry["time"]).tzinfo is not None

    def test_host_lines_and_exceptions(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Lines of setup_logger loggers are JSON too, with the traceback as a field."""
        _use_format(monkeypatch, "json")
        logger = setup_logger("json.host")
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed %s", "here")
        entry = json.loads(stderr_lines(capsys)[0])
        assert entry["message"] == "failed here" and entry["level"] == "ERROR"
        assert "ValueError: bad" in entry["exception"]

    def test_unknown_format_falls_back_to_text(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A format other than text/json keeps the text format, with a warning."""
        _use_format(monkeypatch, "xml")
        setup_logger("json.fallback").info("plain")
        lines = stderr_lines(capsys)
        assert any("'xml'" in line for line in lines)
        assert LINE.match(lines[-1])


class TestRequestContext:
    def test_text_lines_carry_the_request_id(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Inside request_context every line names the request."""
        logger = setup_logger("ctx.text")
        utils_logging.set_debug_level(1)
        with request_context("req_abc"):
            logger.info("start")
            debug(1, "detail")
        logger.info("outside")
        bodies = [line.split(": ", 1)[1] for line in stderr_lines(capsys)]
        assert bodies == ["[req_abc] start", "[req_abc] detail", "outside"]

    def test_json_lines_carry_the_request_id(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """In JSON the id is a field of its own."""
        _use_format(monkeypatch, "json")
        with request_context("req_json"):
            setup_logger("ctx.json").info("hello")
        entry = json.loads(stderr_lines(capsys)[0])
        assert entry["request_id"] == "req_json" and entry["message"] == "hello"

    def test_generated_ids_are_unique(self) -> None:
        """Without an id, a random one is made."""
        with request_context() as first, request_context() as second:
            assert first != second and first.startswith("req_")

    def test_tasks_and_threads_keep_their_own_id(self) -> None:
        """Concurrent asyncio tasks and threads never see each other's id."""
        seen: dict[str, str | None] = {}

        async def task(name: str) -> None:
            with request_context(name):
                await asyncio.sleep(0)
                seen[name] = utils_logging.get_request_id()

        async def main() -> None:
            await asyncio.gather(*(task(f"task-{n}") for n in range(20)))

        asyncio.run(main())

        def thread(name: str) -> None:
            with request_context(name):
                seen[name] = utils_logging.get_request_id()

        threads = [threading.Thread(target=thread, args=(f"thread-{n}",)) for n in range(8)]
        for each in threads:
            each.start()
        for each in threads:
            each.join()
        assert all(key == value for key, value in seen.items()) and len(seen) == 28
        assert utils_logging.get_request_id() is None


class TestColour:
    @pytest.mark.parametrize(
        ("environment", "coloured"),
        [
            ({}, False),
            ({"FORCE_COLOR": "1"}, True),
            ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False),
            ({"FORCE_COLOR": "0"}, False),
        ],
    )
    def test_colour_follows_the_environment(
        self,
        environment: dict[str, str],
        coloured: bool,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """No colour off a TTY unless FORCE_COLOR; NO_COLOR always wins."""
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        utils_logging.reload_from_environment()
        setup_logger("colour.check").warning("look")
        assert ("\x1b[" in capsys.readouterr().err) is coloured


class TestStartupBanner:
    def test_silent_at_level_zero(self, capsys: pytest.CaptureFixture[str]) -> None:
        """With debugging off there is no banner."""
        display_debug_startup()
        assert stderr_lines(capsys) == []

    def test_banner_describes_the_level(self, debug_dir: object, capsys: pytest.CaptureFixture[str]) -> None:
        """The banner names the level, what each level shows, and where error files go."""
        utils_logging.set_debug_level(2)
        display_debug_startup()
        text = capsys.readouterr().err
        assert "ANYCLAUDE DEBUG MODE: level 2 (VERBOSE)" in text
        assert "[on ] level 2 (VERBOSE)" in text and "[off] level 3 (TRACE)" in text
        assert utils_logging.get_debug_directory() in text
