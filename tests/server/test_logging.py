"""The server's log lines, as the integration guide shows them, at level 0 and level 3."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from .conftest import RunningServer
from .helpers import post_chat

pytestmark = pytest.mark.e2e

LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[[\w.]+\] (DEBUG|INFO|WARNING|ERROR): ")
SECRET = "sk-ant-api03-logtestsecret0000"


def _chat(server: RunningServer, content: str, **fields: object) -> httpx.Response:
    """A chat request carrying a secret-shaped key, which no log line may show."""
    return post_chat(server, content, max_tokens=4, headers={"Authorization": f"Bearer {SECRET}"}, **fields)


def own_lines(server: RunningServer, response: httpx.Response) -> str:
    """This request's log records only: lines that carry its id, with their continuations (pretty data)."""
    request_id = response.headers["x-request-id"]
    kept: list[str] = []
    mine = False
    for line in server.log_text().splitlines():
        if LINE.match(line):
            mine = f"[{request_id}]" in line
        if mine:
            kept.append(line)
    return "\n".join(kept)


class TestLevelZero:
    def test_two_info_lines_with_numbers(self, server: RunningServer) -> None:
        """Each request logs the guide's two INFO lines; the second carries tokens, TTFT and speed."""
        response = _chat(server, "Hello there")
        assert response.status_code == 200
        log = own_lines(server, response)
        assert "[mlx] INFO: [req_" in log and "] Processing chat request" in log
        completed = re.findall(
            r"Chat request completed successfully: (\d+) prompt tokens \(\d+ cached\), (\d+) completion tokens, "
            r"finish_reason=\w+, queue \d+ms, time to first token \d+ms, [\d.]+ tokens/s",
            log,
        )
        assert completed

    def test_no_debug_output(self, server: RunningServer) -> None:
        """At level 0 there are no debug lines and no banner."""
        log = server.log_text()
        assert " DEBUG: " not in log and "ANYCLAUDE DEBUG MODE" not in log

    def test_uvicorn_lines_once_in_the_same_format(self, server: RunningServer) -> None:
        """uvicorn's own lines use the same format and are never printed twice."""
        probe = f"/health?probe={uuid.uuid4().hex}"
        assert httpx.get(server.base_url + probe).status_code == 200
        log = server.log_text()
        assert log.count("Uvicorn running on") == 1
        access = [line for line in log.splitlines() if "[uvicorn.access]" in line]
        assert all(LINE.match(line) for line in access)
        assert len([line for line in access if probe in line]) == 1

    def test_every_line_is_formatted(self, server: RunningServer) -> None:
        """Every line the server writes follows the format (tracebacks aside)."""
        lines = [line for line in server.log_text().splitlines() if line.strip()]
        assert lines and all(LINE.match(line) for line in lines)


class TestLevelThree:
    def test_trace_shows_the_request_redacted(self, trace_server: RunningServer) -> None:
        """debug(3, "Chat request", body) is pretty-printed with secrets masked."""
        response = _chat(trace_server, f"my key is {SECRET}", stop=["zzz"])
        assert response.status_code == 200
        log = own_lines(trace_server, response)
        assert SECRET not in trace_server.log_text()
        assert "DEBUG: [req_" in log and '] Chat request {\n  "messages": [' in log
        assert SECRET not in log and "logtestsecret" not in log
        assert "[REDACTED]" in log

    def test_timer_checkpoints(self, trace_server: RunningServer) -> None:
        """The chat_completion timer logs the guide's checkpoints and its total."""
        response = _chat(trace_server, "Hi, timer")
        assert response.status_code == 200
        log = own_lines(trace_server, response)
        for checkpoint in ("request_parsed", "cache_check", "prompt_processed", "inference_complete"):
            assert re.search(rf"\[Timer\] chat_completion @ {checkpoint}: [\d.]+ms", log), checkpoint
        assert re.search(r"\[Timer\] chat_completion completed in [\d.]+ms", log)

    def test_banner_at_start(self, trace_server: RunningServer) -> None:
        """display_debug_startup() runs at start."""
        assert "ANYCLAUDE DEBUG MODE: level 3 (TRACE)" in trace_server.log_text()

    def test_rejected_request_is_logged_and_filed(self, trace_server: RunningServer) -> None:
        """A 400 at debug level logs why; the Authorization header never appears."""
        response = _chat(trace_server, "x", temperature=9)
        assert response.status_code == 400
        assert "Rejected request" in own_lines(trace_server, response)
        assert SECRET not in trace_server.log_text()
