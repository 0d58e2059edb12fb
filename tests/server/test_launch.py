"""``launch``: the real Claude Code, Codex and OpenCode CLIs started against the server in one command.

Against a server already answering on the port (the scripted engine over real
HTTP), each CLI completes a tool round trip with only what ``launch`` gave it
(its home directory is empty: no configuration of its own); against no server,
``launch`` starts one on the default model, Claude Code answers, and the server
stops with it.  (Codex through ``launch`` on the default model is in
test_agent_cli_codex.py, on that file's server, whose cache holds Codex's
prompt by then.)  OpenCode's ~7k-token prompt on the real model would take
minutes of CPU prefill, so it meets the real model nowhere in CI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlx_server.settings import Settings

from .conftest import free_port, launch
from .scripted import ScriptedServer, scripted_server, served_over_http, tool_round_trip

pytestmark = pytest.mark.e2e

GREETING = {"command": "echo hello-from-tool", "description": "Print a greeting"}


@pytest.fixture(scope="module")
def answering() -> Iterator[tuple[ScriptedServer, int]]:
    """The scripted model already answering on a port (a window that holds each CLI's full prompt)."""
    server = scripted_server(Settings(response_cache_size=0), context_length=65_536)
    with served_over_http(server) as base_url:
        yield server, int(base_url.rsplit(":", 1)[1])


AGENT_RUNS = {
    "claude": ("Bash", GREETING, ["-p", "Run the greeting.", "--tools", "Bash", "--allowedTools", "Bash",
                                  "--output-format", "json", "--bare"]),
    "codex": ("exec_command", {"cmd": "echo hello-from-tool"},
              ["exec", "--json", "--skip-git-repo-check", "Run the greeting."]),
    "opencode": ("bash", GREETING, ["run", "--format", "json", "--title", "e2e", "Run the greeting."]),
}  # fmt: skip


@pytest.mark.parametrize("agent", sorted(AGENT_RUNS))
def test_an_agent_on_a_running_server_completes_a_tool_round_trip(
    agent: str, answering: tuple[ScriptedServer, int], tmp_path: Path
) -> None:
    server, port = answering
    tool, arguments, agent_arguments = AGENT_RUNS[agent]
    server.engine.respond_with(tool_round_trip(tool, arguments))
    before = len(server.engine.requests)
    ran = launch(agent, ["--port", str(port)], agent_arguments, tmp_path / "home", tmp_path / "work")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"Using the server already answering on http://127.0.0.1:{port}" in ran.stderr
    prompts = [server.engine.tokenizer.decode(request.prompt) for request in server.engine.requests[before:]]
    assert any("hello-from-tool" in prompt.rsplit("<tool_response>", 1)[-1] for prompt in prompts), ran.stdout
    assert not list((tmp_path / "home").glob("**/config.toml")), "nothing written into the agent's own config"


def test_the_agents_exit_code_is_launchs(answering: tuple[ScriptedServer, int], tmp_path: Path) -> None:
    _, port = answering
    ran = launch("claude", ["--port", str(port)], ["--no-such-option"], tmp_path / "home", tmp_path / "work")
    assert ran.returncode != 0


def test_launch_starts_a_server_the_agent_answers_on_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    server_arguments = ["--port", str(port), "--default-temperature", "0", "--default-repetition-penalty", "1.3"]
    ran = launch("claude", server_arguments, ["-p", "Say hi", "--output-format", "json", "--bare"],
                 tmp_path / "home", tmp_path / "work")  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result = json.loads(ran.stdout[ran.stdout.index("{") :])
    assert result["is_error"] is False and result["result"].strip()
    assert "Starting the server on" in ran.stderr and "Starting claude on" in ran.stderr
    log = tmp_path / "home" / ".cache" / "mlx-server" / f"launch-{port}.log"
    assert "POST /v1/messages" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
