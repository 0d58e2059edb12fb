"""Shared fixtures for the utils_logging specifications.

The module reads ANYCLAUDE_* at import, so they are cleared before it is imported;
every test starts at level 0 in text format and leaves it that way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

for _name in [name for name in os.environ if name.startswith("ANYCLAUDE_")] + ["NO_COLOR", "FORCE_COLOR"]:
    os.environ.pop(_name, None)

import pytest  # noqa: E402

import utils_logging  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_module_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    utils_logging.set_debug_level(0)
    yield
    monkeypatch.undo()
    utils_logging.reload_from_environment()


@pytest.fixture
def debug_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private debug directory for error files, in this test's temp dir."""
    directory = tmp_path / "debug-files"
    monkeypatch.setenv("ANYCLAUDE_DEBUG_DIR", str(directory))
    return directory
