"""End to end: the real Claude Code CLI (pinned in tools/agent-clis, installed by make test) against the server.

It connects directly with ``ANTHROPIC_BASE_URL``, no proxy, on 127.0.0.1 with
its telemetry and non-essential traffic off, in an empty home directory.
``--bare`` keeps its prompt (~1k tokens) inside the default model's context.
Claude Code sends no sampling settings, and at the API's default temperature
of 1 the 135M model rambles for thousands of tokens; the server runs greedy
with a repetition penalty (``--default-temperature 0
--default-repetition-penalty 1.3``), which ends its answers within a few
dozen tokens, and ``CLAUDE_CODE_MAX_OUTPUT_TOKENS`` bounds a runaway answer.

A session long enough to compact is many turns of several thousand tokens;
the mechanics (the window the start-up line gives, the usage the server
reports, the compaction) do not depend on the model's words, so that one runs
on the scripted engine, over real HTTP, with the real CLI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_server.agent_environment import ClaudeCodeEnvironment
from mlx_server.settings import Settings

from .conftest import ROOT, RunningServer, run_agent_cli, start_server, stop_server
from .scripted import scripted_server, served_over_http, tool_round_trip

pytestmark = pytest.mark.e2e

CLAUDE = ROOT / "tools" / "agent-clis" / "node_modules" / ".bin" / "claude"
CLI_TIMEOUT_SECONDS = 300
MAX_OUTPUT_TOKENS = "512"
DEFAULT_CONTEXT = 8192  # the default model's


@pytest.fixture(scope="module")
def claude_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of its own, so that the cache figures are this conversation's."""
    arguments = ["--response-cache-size", "0", "--default-temperature", "0", "--default-repetition-penalty", "1.3"]
    running = start_server(tmp_path_factory.mktemp("claude-code") / "server.log", arguments=arguments)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("claude-workspace")


def claude(
    base_url: str, workspace: Path, *arguments: str, environment: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``claude -p ... --output-format json --bare`` and return its result object (exit 0 required)."""
    environment = {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-local-test",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": MAX_OUTPUT_TOKENS,
        **(environment or {}),
    }
    command = [*arguments, "--output-format", "json", "--bare", "--model", "local-model"]
    stdout = run_agent_cli(CLAUDE, command, workspace, workspace / "home", environment, CLI_TIMEOUT_SECONDS)
    result: dict[str, Any] = json.loads(stdout[stdout.index("{") :])
    return result


def prompt_tokens_logged(log: str) -> list[int]:
    """The prompt tokens of each request the server completed, from its log lines."""
    return [int(count) for count in re.findall(r"completed successfully: (\d+) prompt tokens", log)]


def startup_environment(server: RunningServer) -> tuple[dict[str, str], int]:
    """The variables the server's start-up line tells Claude Code to start with, and where it then compacts."""
    line = re.search(r"Claude Code: start it with (.+?) so that it compacts at (\d+)", server.log_text())
    assert line is not None, "the start-up line with Claude Code's environment is missing"
    return dict(assignment.split("=", 1) for assignment in line.group(1).split()), int(line.group(2))


def test_a_prompt_and_its_continuation(claude_server: RunningServer, workspace: Path) -> None:
    """Turn 1 answers; turn 2 (--continue) reads at least 95% of its input from the prompt cache.

    Claude Code merges the usage of ``message_start`` and ``message_delta``:
    what it reports must add up to the prompt the server saw, not twice it.
    """
    first = claude(claude_server.base_url, workspace, "-p", "Say hi")
    assert first["is_error"] is False and first["subtype"] == "success"
    assert first["result"].strip()
    served_before = len(prompt_tokens_logged(claude_server.log_text()))

    second = claude(claude_server.base_url, workspace, "-p", "Now say bye", "--continue")
    assert second["is_error"] is False and second["result"].strip()
    usage = second["usage"]
    reported = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    assert reported == sum(prompt_tokens_logged(claude_server.log_text())[served_before:])
    assert usage["cache_read_input_tokens"] >= 0.95 * reported
    assert "POST /v1/messages?beta=true" in claude_server.log_text()


def test_the_start_up_lines_environment_is_what_claude_code_reads(
    claude_server: RunningServer, workspace: Path
) -> None:
    """The window the start-up line gives is the one Claude Code then works with."""
    environment, _ = startup_environment(claude_server)
    result = claude(claude_server.base_url, workspace, "-p", "Say hi", environment=environment)
    (usage,) = result["modelUsage"].values()
    assert usage["contextWindow"] == int(environment["CLAUDE_CODE_MAX_CONTEXT_TOKENS"])


def test_a_session_that_outgrows_the_context_compacts_instead_of_failing(tmp_path: Path) -> None:
    """With the start-up line's environment, Claude Code summarizes the conversation before the 8k window is full.

    Each turn adds ~1k tokens; by the seventh the conversation would be past the default model's context.  The
    scripted engine answers every turn (and the summary) with a few words and reports the prompt's real length.
    """
    server = scripted_server(Settings(response_cache_size=0), context_length=DEFAULT_CONTEXT)
    server.engine.respond_with(lambda _request, _prompt: "OK.")
    claude_code = ClaudeCodeEnvironment(DEFAULT_CONTEXT)
    environment, compacts_at = claude_code.variables, claude_code.compacts_at
    notes = " ".join(f"item{index} is a note about the design of the cache." for index in range(60))
    with served_over_http(server) as base_url:
        for turn in range(7):
            arguments = ["-p", f"Turn {turn}. Remember these notes: {notes}. Reply with OK."]
            result = claude(base_url, tmp_path, *arguments, *(["--continue"] if turn else []), environment=environment)
            assert result["is_error"] is False, result
        refused = [line for line in httpx.get(f"{base_url}/metrics").text.splitlines()
                   if line.startswith("mlx_server_requests_total") and 'status="400"' in line]  # fmt: skip
    prompts = [len(request.prompt) for request in server.engine.requests]
    assert max(prompts) > compacts_at  # it grew past the compaction point ...
    assert any(later < earlier // 2 for earlier, later in zip(prompts, prompts[1:]))  # ... and was summarized
    assert not refused  # never refused as too long


def test_a_tool_round_trip_with_streamed_arguments(tmp_path: Path) -> None:
    """The model calls Bash, its arguments streamed token by token; Claude Code runs it and sends the output back.

    The command's output in the next prompt is the proof that the pieces added up to the arguments written.
    """
    server = scripted_server(Settings(response_cache_size=0), context_length=DEFAULT_CONTEXT)
    call = {"command": "echo hello-from-tool", "description": "Print a greeting"}
    server.engine.respond_with(tool_round_trip("Bash", call))
    with served_over_http(server) as base_url:
        result = claude(base_url, tmp_path, "-p", "Run the greeting.", "--tools", "Bash", "--allowedTools", "Bash")
    assert result["is_error"] is False and result["result"].strip() == "Done.", result
    *_, answered = [server.engine.tokenizer.decode(request.prompt) for request in server.engine.requests]
    assert re.search(r"<tool_response>\s*hello-from-tool\s*</tool_response>", answered), answered[-400:]
