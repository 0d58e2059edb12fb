"""End to end: the real OpenCode CLI (pinned in tools/agent-clis, installed by make test) against the server.

OpenCode reaches a local server as a custom OpenAI-compatible provider
(``@ai-sdk/openai-compatible``, bundled in its binary) whose ``baseURL`` is
the server; its output limit is left as it is, so every request asks for
``max_tokens: 32000`` against a 16,384-token window with a ~7k-token prompt:
the server treats it as a ceiling.  It runs in an empty home directory with
model catalog fetches, updates, sharing, plugins and LSP downloads off, so
nothing leaves 127.0.0.1.  ``--title`` skips the side request that names the
session.  The ceiling is the chat core's rule, whatever the model: the
scripted engine answers, over real HTTP (``launch`` drives OpenCode to a
tool round trip too, tests/server/test_launch.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_server.settings import Settings

from .conftest import ROOT, run_agent_cli
from .scripted import ScriptedServer, scripted_server, served_over_http, tool_round_trip

pytestmark = pytest.mark.e2e

OPENCODE = ROOT / "tools" / "agent-clis" / "node_modules" / ".bin" / "opencode"
CLI_TIMEOUT_SECONDS = 600
OFFLINE = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
}


WINDOW = 16_384


@pytest.fixture
def opencode_server() -> Iterator[tuple[ScriptedServer, str]]:
    """The scripted model on a real port, with a window that holds OpenCode's prompt but not 32,000 more tokens."""
    server = scripted_server(Settings(response_cache_size=0), context_length=WINDOW)
    server.engine.respond_with(lambda _request, _prompt: "Hello.")
    with served_over_http(server) as base_url:
        yield server, base_url


def opencode(base_url: str, workspace: Path, *arguments: str) -> list[dict[str, Any]]:
    """Run ``opencode run --format json``; returns its events (exit 0 required)."""
    config = {
        "provider": {
            "local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Local MLX server",
                "options": {"baseURL": f"{base_url}/v1", "apiKey": "sk-local-test"},
                "models": {"default": {"name": "default"}},
            }
        },
        "model": "local/default",
        "autoupdate": False,
        "share": "disabled",
    }
    environment = {"OPENCODE_CONFIG_CONTENT": json.dumps(config), **OFFLINE}
    command = ["run", "--format", "json", "--title", "e2e", *arguments]
    stdout = run_agent_cli(OPENCODE, command, workspace, workspace / "home", environment, CLI_TIMEOUT_SECONDS)
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_run_answers_with_its_default_output_limit(opencode_server: tuple[ScriptedServer, str], tmp_path: Path) -> None:
    """``max_tokens: 32000`` past the window is a ceiling, not a 400; the answer comes back."""
    server, base_url = opencode_server
    events = opencode(base_url, tmp_path, "Say hello in one word.")
    texts = [event["part"]["text"] for event in events if event["type"] == "text"]
    assert "".join(texts).strip(), events
    (finish,) = [event["part"] for event in events if event["type"] == "step_finish"]
    assert finish["tokens"]["input"] + finish["tokens"]["cache"]["read"] > 4000  # its whole prompt was served
    (request,) = server.engine.requests
    assert len(request.prompt) + request.max_tokens == WINDOW, "the limit became the room left in the window"
    statuses = [line for line in httpx.get(f"{base_url}/metrics").text.splitlines()
                if line.startswith("mlx_server_requests_total") and "/v1/chat/completions" in line]  # fmt: skip
    assert any('status="200"' in line for line in statuses) and not any('status="400"' in line for line in statuses)


def test_a_tool_round_trip_with_streamed_arguments(tmp_path: Path) -> None:
    """The model calls ``bash``, its arguments streamed as chat argument chunks; OpenCode runs the command and
    sends its output back, and the next answer ends the run."""
    server = scripted_server(Settings(response_cache_size=0), context_length=WINDOW)
    call = {"command": "echo hello-from-tool", "description": "Print a greeting"}
    server.engine.respond_with(tool_round_trip("bash", call))
    with served_over_http(server) as base_url:
        events = opencode(base_url, tmp_path, "Run the greeting.")
    tools = [event["part"] for event in events if event["type"] == "tool_use"]
    assert [part["state"]["input"] for part in tools] == [call], events
    assert "hello-from-tool" in tools[0]["state"]["output"]
    texts = [event["part"]["text"] for event in events if event["type"] == "text"]
    assert "".join(texts).strip() == "Done."
