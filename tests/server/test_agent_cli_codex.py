"""End to end: the real Codex CLI (pinned in tools/agent-clis, installed by make test) against the server.

Codex is configured as its README in ../shared/codex shows: a custom provider
whose ``base_url`` is the server and ``wire_api = "responses"``, in a private
``CODEX_HOME``, with its prompt shrunk (short instructions, plugins, sub-agents,
goals and web search off) to fit the default model's 8,192-token context.  It
resends the whole history every step, so the prefix cache is what makes the
second turn fast.  Codex sends no sampling settings; the server is greedy with
a repetition penalty here, so the 135M model's answers stay short.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_server.settings import Settings

from .conftest import ROOT, RunningServer, launch, run_agent_cli, start_server, stop_server
from .scripted import scripted_server, served_over_http, tool_round_trip

pytestmark = pytest.mark.e2e

CODEX = ROOT / "tools" / "agent-clis" / "node_modules" / ".bin" / "codex"
CLI_TIMEOUT_SECONDS = 300
SHRINK = [
    "--disable", "plugins", "--disable", "multi_agent", "--disable", "goals", "-c", "web_search=disabled",
]  # fmt: skip


@pytest.fixture(scope="module")
def codex_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    arguments = ["--response-cache-size", "0", "--default-temperature", "0", "--default-repetition-penalty", "1.3"]
    running = start_server(tmp_path_factory.mktemp("codex") / "server.log", arguments=arguments)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def codex_home(tmp_path_factory: pytest.TempPathFactory, codex_server: RunningServer) -> Path:
    return codex_configured(tmp_path_factory.mktemp("codex-home"), codex_server.api_url)


def codex_configured(home: Path, api_url: str) -> Path:
    """A private ``CODEX_HOME`` whose provider is the server at ``api_url``."""
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        'model_provider = "local"\nmodel = "local-model"\n[model_providers.local]\nname = "Local MLX server"\n'
        f'base_url = "{api_url}"\nwire_api = "responses"\nenv_key = "OPENAI_API_KEY"\n'
    )
    (home / "instructions.md").write_text("You are a helpful coding assistant. Answer briefly.\n")
    return home


def codex(home: Path, workspace: Path, *arguments: str) -> list[dict[str, Any]]:
    """Run ``codex exec --json``; returns its events (exit 0 required)."""
    options = [*SHRINK, "-c", f"model_instructions_file={home / 'instructions.md'}"]
    command = ["exec", "--json", "--skip-git-repo-check", *options, *arguments]
    environment = {"CODEX_HOME": str(home), "OPENAI_API_KEY": "sk-local-test"}
    return json_events(run_agent_cli(CODEX, command, workspace, home, environment, CLI_TIMEOUT_SECONDS))


def json_events(stdout: str) -> list[dict[str, Any]]:
    """``codex exec --json``'s events: the lines of its output that are JSON objects."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def answer(events: list[dict[str, Any]]) -> str:
    messages = [event["item"]["text"] for event in events if event.get("item", {}).get("type") == "agent_message"]
    return "\n".join(messages)


def usage(events: list[dict[str, Any]]) -> dict[str, int]:
    """The thread's token totals so far, from its last turn.completed event."""
    completed = [event["usage"] for event in events if event["type"] == "turn.completed"]
    assert completed, events
    return dict(completed[-1])


def test_exec_and_resume(codex_home: Path, codex_server: RunningServer, tmp_path: Path) -> None:
    """A one-line task answers; resuming it reads most of the (resent) history from the prompt cache."""
    first = codex(codex_home, tmp_path, "Say hi.")
    assert answer(first).strip()
    second = codex(codex_home, tmp_path, "resume", "--last", "Now say bye.")
    assert answer(second).strip()
    before, after = usage(first), usage(second)
    turn_input = after["input_tokens"] - before["input_tokens"]  # Codex reports the thread's running totals
    turn_cached = after["cached_input_tokens"] - before["cached_input_tokens"]
    assert turn_input > before["input_tokens"], "the second turn resends the first"
    assert turn_cached >= 0.9 * turn_input
    assert "POST /v1/responses HTTP/1.1" in codex_server.log_text()


def test_launch_codex_answers_on_the_default_model_through_a_running_server(
    codex_home: Path, codex_server: RunningServer, tmp_path: Path
) -> None:
    """``launch codex`` against this file's server: Codex configured by launch alone answers from the real model
    (after the test above, Codex's instructions and tools are read from the prompt cache)."""
    port = codex_server.base_url.rsplit(":", 1)[1]
    options = [*SHRINK, "-c", f"model_instructions_file={codex_home / 'instructions.md'}"]
    agent_arguments = ["exec", "--json", "--skip-git-repo-check", *options, "Say hi."]
    ran = launch("codex", ["--port", port], agent_arguments, tmp_path / "home", tmp_path / "work")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    events = json_events(ran.stdout)
    assert answer(events).strip(), events


def test_a_tool_round_trip_with_streamed_arguments(tmp_path: Path) -> None:
    """The model calls ``exec_command``, its arguments streamed token by token (the scripted engine); Codex runs
    the command and sends its output back, and the next answer ends the turn."""
    server = scripted_server(Settings(response_cache_size=0))
    server.engine.respond_with(tool_round_trip("exec_command", {"cmd": "echo hello-from-tool"}))
    with served_over_http(server) as base_url:
        home = codex_configured(tmp_path / "home", f"{base_url}/v1")
        (workspace := tmp_path / "workspace").mkdir()
        events = codex(home, workspace, "Run the greeting.")
    commands = [event["item"] for event in events if event.get("item", {}).get("type") == "command_execution"]
    assert any("hello-from-tool" in item.get("aggregated_output", "") for item in commands), events
    assert answer(events).strip() == "Done."
    *_, answered = [server.engine.tokenizer.decode(request.prompt) for request in server.engine.requests]
    assert "hello-from-tool" in answered.rsplit("<tool_response>", 1)[-1]
