"""Small helpers shared by the utils_logging specifications."""

from __future__ import annotations

import json
import re

import pytest

#: The guide's line format: ``[2025-10-28 22:46:27] [mlx] INFO: message``.
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] \[([\w.]+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$")


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def data_of(line: str, message: str) -> object:
    """The JSON data that follows ``message`` on a debug line."""
    match = LINE.match(line)
    assert match, f"not a log line: {line!r}"
    body = match.group(4)
    assert body.startswith(message + " "), body
    return json.loads(body[len(message) + 1 :])
