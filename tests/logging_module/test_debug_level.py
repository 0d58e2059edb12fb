"""ANYCLAUDE_DEBUG selects the level: parsed once, clamped, with one warning for nonsense."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import utils_logging
from utils_logging import DebugLevel

from .helpers import stderr_lines

SCRIPTS = Path(utils_logging.__file__).parent


class TestParsing:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("", 0),
            ("   ", 0),
            ("0", 0),
            ("1", 1),
            ("2", 2),
            ("3", 3),
            (" 2 ", 2),
            ("7", 3),
            ("99999999999999999999", 3),
            ("-1", 0),
            ("true", 1),
            ("YES", 1),
            ("On", 1),
            ("false", 0),
            ("no", 0),
            ("OFF", 0),
        ],
    )
    def test_valid_values(self, raw: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
        """Integers clamp to 0-3; true/yes/on is 1; false/no/off and empty are 0."""
        monkeypatch.setenv("ANYCLAUDE_DEBUG", raw)
        assert utils_logging.reload_from_environment() == expected
        assert utils_logging.get_debug_level() == expected

    def test_unset_is_disabled(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No variable means no debugging."""
        monkeypatch.delenv("ANYCLAUDE_DEBUG", raising=False)
        assert utils_logging.reload_from_environment() is DebugLevel.DISABLED

    @pytest.mark.parametrize("raw", ["verbose", "2.5", "level-2", "0x2"])
    def test_nonsense_is_disabled_with_one_warning(
        self, raw: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unusable value turns debugging off and says once which value was wrong."""
        monkeypatch.setenv("ANYCLAUDE_DEBUG", raw)
        utils_logging.reload_from_environment()
        utils_logging.reload_from_environment()
        warnings = [line for line in stderr_lines(capsys) if "WARNING" in line]
        assert utils_logging.get_debug_level() == 0
        assert len(warnings) == 1
        assert repr(raw) in warnings[0]

    def test_level_is_read_at_import(self) -> None:
        """A fresh process takes its level from the environment it starts with."""
        result = subprocess.run(
            [sys.executable, "-c", "import utils_logging as u; print(int(u.get_debug_level()))"],
            cwd=SCRIPTS,
            env={**os.environ, "ANYCLAUDE_DEBUG": "2"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() == "2"

    def test_level_is_cached_until_reloaded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Changing the variable later has no effect until reload_from_environment()."""
        monkeypatch.setenv("ANYCLAUDE_DEBUG", "3")
        assert utils_logging.get_debug_level() == 0
        utils_logging.reload_from_environment()
        assert utils_logging.get_debug_level() == 3


class TestRunTimeChanges:
    @pytest.mark.parametrize(("requested", "expected"), [(0, 0), (2, 2), (3, 3), (9, 3), (-4, 0), (True, 1)])
    def test_set_debug_level_clamps(self, requested: int, expected: int) -> None:
        """set_debug_level accepts any integer and clamps it."""
        assert utils_logging.set_debug_level(requested) == expected
        assert utils_logging.get_debug_level() == expected

    def test_set_debug_level_ignores_non_numbers(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A value that is not a number leaves the level alone and warns; it never raises."""
        utils_logging.set_debug_level(2)
        utils_logging.set_debug_level("loud")  # type: ignore[arg-type]
        assert utils_logging.get_debug_level() == 2
        assert any("'loud'" in line for line in stderr_lines(capsys))

    @pytest.mark.parametrize(
        ("level", "enabled", "verbose", "trace"),
        [(0, False, False, False), (1, True, False, False), (2, True, True, False), (3, True, True, True)],
    )
    def test_predicates(self, level: int, enabled: bool, verbose: bool, trace: bool) -> None:
        """is_*_enabled() answer for the current level."""
        utils_logging.set_debug_level(level)
        assert utils_logging.is_debug_enabled() is enabled
        assert utils_logging.is_verbose_debug_enabled() is verbose
        assert utils_logging.is_trace_debug_enabled() is trace
