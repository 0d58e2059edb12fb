"""``launch``: one command from install to an agent on a local model.

    python3 scripts/mlx-server.py launch claude|codex|opencode [server options] [-- agent arguments]

Reuses a server already answering on the port (``--host``/``--port``, with
its API key) or starts one with the server options (its output to a log
file, shown on the terminal until the model is ready); then runs the agent
CLI with everything it needs in its environment or on its command line, and
nothing written into the user's own configuration: the base URL and key, the
model's name, Claude Code's context and output limits from the model's real
context (``agent_environment``) and its small model (a served model named
``small``, else the main one), Codex's provider as ``-c`` overrides, OpenCode's
through ``OPENCODE_CONFIG_CONTENT``; telemetry and non-essential traffic off.
The agent's exit code is ``launch``'s; a server it started stops with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from mlx_server.agent_environment import ClaudeCodeEnvironment
from mlx_server.settings import Settings, parse_settings

__all__ = ["AGENTS", "ServedModel", "agent_command", "launch"]

AGENTS = ("claude", "codex", "opencode")
SMALL_MODEL = "small"  # a served model by this name takes Claude Code's side requests
START_TIMEOUT_SECONDS = 1800.0  # a first start may download or convert a large model
ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINTS = {
    "claude": "npm install -g @anthropic-ai/claude-code",
    "codex": "npm install -g @openai/codex",
    "opencode": "npm install -g opencode-ai",
}
QUIET = {
    "claude": {"DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
               "DISABLE_ERROR_REPORTING": "1"},
    "codex": {},  # Codex sends nothing but model requests to a custom provider
    "opencode": {"OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1",
                 "OPENCODE_DISABLE_SHARE": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1"},
}  # fmt: skip
KEY_VARIABLE = "MLX_SERVER_AGENT_KEY"  # Codex reads its provider's key from a variable it is told the name of


@dataclass(frozen=True)
class ServedModel:
    """What an agent is told about the server: where it is, its key, its model and that model's context."""

    base_url: str
    key: str
    model: str
    context_length: int
    small_model: str


def agent_command(agent: str, served: ServedModel, executable: str, arguments: Sequence[str]) -> tuple[
    list[str], dict[str, str]]:  # fmt: skip
    """The agent's command line and the variables to add to its environment."""
    if agent == "claude":
        claude = ClaudeCodeEnvironment(served.context_length)
        variables = {"ANTHROPIC_BASE_URL": served.base_url, "ANTHROPIC_API_KEY": served.key,
                     "ANTHROPIC_MODEL": served.model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": served.small_model,
                     **claude.variables}  # fmt: skip
        return [executable, *arguments], variables | QUIET[agent]
    if agent == "codex":
        provider = {"name": "MLX server", "base_url": f"{served.base_url}/v1", "wire_api": "responses",
                    "env_key": KEY_VARIABLE}  # fmt: skip
        overrides = [f"model_providers.mlx.{key}={json.dumps(value)}" for key, value in provider.items()]
        overrides += ['model_provider="mlx"', f"model={json.dumps(served.model)}",
                      f"model_context_window={served.context_length}"]  # fmt: skip
        flags = [part for override in overrides for part in ("-c", override)]
        return [executable, *flags, *arguments], {KEY_VARIABLE: served.key} | QUIET[agent]
    limits = {"context": served.context_length, "output": ClaudeCodeEnvironment(served.context_length).max_output}
    config = {
        "provider": {"mlx": {"npm": "@ai-sdk/openai-compatible", "name": "MLX server",
                             "options": {"baseURL": f"{served.base_url}/v1", "apiKey": served.key},
                             "models": {served.model: {"name": served.model, "limit": limits}}}},
        "model": f"mlx/{served.model}",
        "autoupdate": False,
        "share": "disabled",
    }  # fmt: skip
    return [executable, *arguments], {"OPENCODE_CONFIG_CONTENT": json.dumps(config)} | QUIET[agent]


def _split(arguments: Sequence[str]) -> tuple[str, list[str], list[str]]:
    if not arguments or arguments[0] not in AGENTS:
        raise SystemExit(f"usage: mlx-server.py launch {{{','.join(AGENTS)}}} [server options] [-- agent arguments]")
    rest = list(arguments[1:])
    if "--" in rest:
        cut = rest.index("--")
        return arguments[0], rest[:cut], rest[cut + 1 :]
    return arguments[0], rest, []


def _executable(agent: str) -> str:
    """The agent CLI on PATH, else the one ``make test`` installs in this project."""
    found = shutil.which(agent) or shutil.which(
        agent, path=str(ROOT / "tools" / "agent-clis" / "node_modules" / ".bin")
    )
    if found is None:
        raise SystemExit(f"{agent} is not installed: {INSTALL_HINTS[agent]}")
    return found


def _base_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def _health(base_url: str, key: str) -> dict[str, Any] | None:
    """/health once the server is ready, None while it is not answering or loading."""
    try:
        response = httpx.get(f"{base_url}/health", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body if body.get("status") == "ok" else None


def _served(base_url: str, key: str, health: dict[str, Any]) -> ServedModel:
    names = [model["name"] for model in health.get("models", []) if model.get("kind") == "chat"]
    model = str(health.get("model") or (names[0] if names else "default"))
    small = SMALL_MODEL if SMALL_MODEL in names else model
    return ServedModel(base_url, key, model, int(health.get("context_length") or 8192), small)


class _StartedServer:
    """The server this launch started: its output to a log file, echoed to the terminal until the model is ready."""

    def __init__(self, server_arguments: Sequence[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.echo = True
        command = [sys.executable, str(ROOT / "scripts" / "mlx-server.py"), *server_arguments]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)  # fmt: skip
        self._copier = threading.Thread(target=self._copy, name="server-log", daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in iter(self.process.stdout.readline, b""):
                log.write(line)
                log.flush()
                if self.echo:
                    _write(sys.stderr, line.decode(errors="replace"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._copier.join(timeout=5)


def _write(stream: IO[str], text: str) -> None:
    stream.write(text)
    stream.flush()


def _wait_until_ready(base_url: str, key: str, server: _StartedServer) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        health = _health(base_url, key)
        if health is not None:
            return health
        if server.process.poll() is not None:
            raise SystemExit(f"the server stopped before it was ready (exit {server.process.returncode}); "
                             f"its log: {server.log_path}")  # fmt: skip
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {START_TIMEOUT_SECONDS:.0f} s; its log: {server.log_path}")


def launch(arguments: Sequence[str]) -> int:
    """Run an agent against this server (started here when none answers); the agent's exit code."""
    agent, server_arguments, agent_arguments = _split(arguments)
    executable = _executable(agent)
    settings = parse_settings(server_arguments)
    base_url = _base_url(settings)
    key = settings.api_keys.first() or "mlx-server"
    started: _StartedServer | None = None
    health = _health(base_url, key)
    try:
        if health is None:
            log_path = Path.home() / ".cache" / "mlx-server" / f"launch-{settings.port}.log"
            _write(sys.stderr, f"Starting the server on {base_url} (log: {log_path})\n")
            started = _StartedServer(server_arguments, log_path)
            health = _wait_until_ready(base_url, key, started)
            started.echo = False
        else:
            _write(sys.stderr, f"Using the server already answering on {base_url}\n")
        served = _served(base_url, key, health)
        command, variables = agent_command(agent, served, executable, agent_arguments)
        _write(sys.stderr, f"Starting {agent} on {served.model} ({served.context_length}-token context)\n")
        return subprocess.run(command, env={**os.environ, **variables}, check=False).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        if started is not None:
            started.stop()
