"""Fixtures that run the real server (real model, real HTTP) for the specifications."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_server.blas import preload_optimized_blas

# In-process tests import MLX; the BLAS must be chosen first, as the server does.
BLAS = preload_optimized_blas()

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINT = ROOT / "scripts" / "mlx-server.py"
AGENT_BIN = ROOT / "tools" / "agent-clis" / "node_modules" / ".bin"
STARTUP_TIMEOUT_SECONDS = 180
AGENT_TIMEOUT_SECONDS = 600


@dataclass
class RunningServer:
    """A server process, its address, and the file its output goes to."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_idle(self, timeout: float = 60, api_key: str | None = None) -> None:
        """Poll /health (its details need the key when the server has one) until no generation runs or waits."""
        headers = {"x-api-key": api_key} if api_key else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = httpx.get(f"{self.base_url}/health", headers=headers, timeout=10).json()["queue"]
            if queue == {"waiting": 0, "running": 0}:
                return
            time.sleep(0.05)
        raise AssertionError("the server did not become idle")


def run_agent_cli(
    executable: Path,
    arguments: list[str],
    workspace: Path,
    home: Path,
    environment: dict[str, str],
    timeout: float,
    stdin: str | None = None,
) -> str:
    """Run an agent CLI from tools/agent-clis in ``workspace``; its stdout (it must exit 0).

    It sees only PATH, ``HOME`` (created here) and ``environment``, and no stdin but ``stdin``: nothing of
    this machine's own configuration or keys.
    """
    assert executable.exists(), f"{executable} is missing: make test installs it (make agent-clis)"
    home.mkdir(exist_ok=True)
    completed = subprocess.run(
        [str(executable), *arguments],
        cwd=workspace,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **environment},
        stdin=subprocess.DEVNULL if stdin is None else None,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    name = executable.name
    assert completed.returncode == 0, f"{name} exited {completed.returncode}:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def launch(agent: str, server_arguments: list[str], agent_arguments: list[str], home: Path,
           workspace: Path) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``mlx-server.py launch`` as a user runs it, with the pinned CLIs on PATH and an empty home."""
    home.mkdir(exist_ok=True)
    workspace.mkdir(exist_ok=True)
    environment = {"PATH": f"{AGENT_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home)}
    command = [sys.executable, str(ENTRY_POINT), "launch", agent, *server_arguments, "--", *agent_arguments]
    return subprocess.run(command, cwd=workspace, env=environment, capture_output=True, text=True,
                          timeout=AGENT_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL, check=False)  # fmt: skip


def run_python(code: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with scripts/ importable (MLX state starts clean there)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT / "scripts"), **(extra_env or {})},
        capture_output=True,
        text=True,
        check=True,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    log_path: Path, extra_env: dict[str, str] | None = None, arguments: list[str] | None = None
) -> RunningServer:
    """Start scripts/mlx-server.py and poll /health until the model is served."""
    port = free_port()
    environment = {**os.environ, "ANYCLAUDE_DEBUG": "0", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, str(ENTRY_POINT), "--port", str(port), *(arguments or [])],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
    if not serving_within(server, STARTUP_TIMEOUT_SECONDS):
        process.kill()
        raise RuntimeError(f"server did not start in {STARTUP_TIMEOUT_SECONDS}s:\n{server.log_text()}")
    return server


def serving_within(server: RunningServer, seconds: float) -> bool:
    """Poll /health until it answers 200 (True) or ``seconds`` pass (False); the process exiting is an error."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    """A two-layer llama from mlx-lm's own class, random weights, a 256-token vocabulary: enough for a generator."""
    import mlx.core as mx  # here: the BLAS is preloaded when this module is imported, before MLX
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=256,
    )  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def loaded_model() -> Any:
    """The default model loaded in this process (for in-process tests)."""
    from mlx_server.model.loading import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The default server: default model, ANYCLAUDE_DEBUG=0."""
    running = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def trace_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server at ANYCLAUDE_DEBUG=3 with its own debug directory."""
    directory = tmp_path_factory.mktemp("trace")
    running = start_server(
        directory / "server.log", {"ANYCLAUDE_DEBUG": "3", "ANYCLAUDE_DEBUG_DIR": str(directory / "debug-files")}
    )
    yield running
    stop_server(running)
