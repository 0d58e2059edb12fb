"""End to end: the real OpenCode CLI (pinned in tools/agent-clis, installed by make test) against the server.

OpenCode reaches a local server as a custom OpenAI-compatible provider
(``@ai-sdk/openai-compatible``, bundled in its binary) whose ``baseURL`` is
the server; its output limit is left as it is, so every request asks for
``max_tokens: 32000`` against the default model's 8,192-token window with a
~7.7k-token prompt: the server treats it as a ceiling.  It runs in an empty
home directory with model catalog fetches, updates, sharing, plugins and LSP
downloads off, so nothing leaves 127.0.0.1.  ``--title`` skips the side
request that names the session.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, RunningServer, run_agent_cli, start_server, stop_server

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


@pytest.fixture(scope="module")
def opencode_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    arguments = ["--response-cache-size", "0", "--default-temperature", "0", "--default-repetition-penalty", "1.3"]
    running = start_server(tmp_path_factory.mktemp("opencode") / "server.log", arguments=arguments)
    yield running
    stop_server(running)


def opencode(server: RunningServer, workspace: Path, *arguments: str) -> list[dict[str, Any]]:
    """Run ``opencode run --format json``; returns its events (exit 0 required)."""
    config = {
        "provider": {
            "local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Local MLX server",
                "options": {"baseURL": server.api_url, "apiKey": "sk-local-test"},
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


def test_run_answers_with_its_default_output_limit(opencode_server: RunningServer, tmp_path: Path) -> None:
    """``max_tokens: 32000`` past an 8k window is a ceiling, not a 400; the answer comes back."""
    events = opencode(opencode_server, tmp_path, "Say hello in one word.")
    texts = [event["part"]["text"] for event in events if event["type"] == "text"]
    assert "".join(texts).strip(), events
    (finish,) = [event["part"] for event in events if event["type"] == "step_finish"]
    assert finish["tokens"]["input"] + finish["tokens"]["cache"]["read"] > 4000  # its whole prompt was served
    log = opencode_server.log_text()
    assert 'POST /v1/chat/completions HTTP/1.1" 200' in log and 'HTTP/1.1" 400' not in log
