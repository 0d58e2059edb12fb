"""What the server benchmarks share: starting a server on a free port, and timing one streamed reply."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "StreamedReply",
    "free_port",
    "mlx_lm_server",
    "our_server",
    "start_and_wait",
    "stream_chat",
    "stream_messages",
    "wait_until_ready",
]

STARTUP_TIMEOUT_SECONDS = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_and_wait(command: list[str], ready_url: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server process and poll ``ready_url`` until it answers 200; exits the benchmark if it never does."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_until_ready(ready_url, process)
    return process


def wait_until_ready(ready_url: str, process: subprocess.Popen[bytes]) -> None:
    """Poll ``ready_url`` until it answers 200; exits the benchmark (killing ``process``) if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{ready_url}: the server exited with {process.returncode}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit(f"{ready_url}: the server did not start")


@dataclass
class StreamedReply:
    """When a streamed reply began, when its content tokens arrived, and its usage."""

    started: float
    first_content: float | None = None
    last_content: float | None = None
    finished: float | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def time_to_first_token_ms(self) -> float:
        first = self.first_content or self.finished or time.perf_counter()
        return (first - self.started) * 1000


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> StreamedReply:
    """POST a streaming chat completion (with usage) and time its events."""
    reply = StreamedReply(started=time.perf_counter())
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                reply.usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if not choices:
                continue
            now = time.perf_counter()
            if choices[0]["delta"].get("content"):
                reply.text += choices[0]["delta"]["content"]
                reply.first_content = reply.first_content or now
                reply.last_content = now
            if choices[0].get("finish_reason"):
                reply.finished = now
    return reply


def stream_messages(client: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> StreamedReply:
    """POST a streaming Anthropic messages request and time its events (usage from message_delta)."""
    reply = StreamedReply(started=time.perf_counter())
    with client.stream("POST", "/v1/messages", json={**body, "stream": True}, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            now = time.perf_counter()
            if event["type"] == "content_block_delta":
                reply.text += event["delta"].get("text", "")
                reply.first_content = reply.first_content or now
                reply.last_content = now
            elif event["type"] == "message_delta":
                reply.usage = event["usage"]
                reply.finished = now
    return reply


@contextmanager
def mlx_lm_server(root: Path, extra: list[str] | None = None) -> Iterator[str]:
    """mlx_lm.server on the default weights (exported with --export-mlx) and the same BLAS; yields its URL."""
    with tempfile.TemporaryDirectory() as directory:
        exported = Path(directory) / "model"
        server = root / "scripts" / "mlx-server.py"
        subprocess.run([sys.executable, str(server), "--export-mlx", str(exported)], check=True, capture_output=True)
        port = free_port()
        launcher = (
            "import sys, runpy; sys.path.insert(0, sys.argv[1]); "
            "from mlx_server.blas import preload_optimized_blas; preload_optimized_blas(); "
            "sys.argv = ['mlx_lm.server'] + sys.argv[2:]; runpy.run_module('mlx_lm.server', run_name='__main__')"
        )
        command = [
            sys.executable, "-c", launcher, str(root / "scripts"),
            "--model", str(exported), "--port", str(port), "--log-level", "ERROR", *(extra or []),
        ]  # fmt: skip
        process = start_and_wait(command, f"http://127.0.0.1:{port}/v1/models")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=120)


@contextmanager
def our_server(root: Path, extra: list[str] | None = None) -> Iterator[str]:
    """scripts/mlx-server.py with the default model at ANYCLAUDE_DEBUG=0; yields its URL."""
    port = free_port()
    command = [sys.executable, str(root / "scripts" / "mlx-server.py"), "--port", str(port), *(extra or [])]
    process = start_and_wait(command, f"http://127.0.0.1:{port}/health", {**os.environ, "ANYCLAUDE_DEBUG": "0"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=120)


def report_targets(missed: list[str]) -> int:
    """Print each missed target and the verdict; the exit status (1 if any was missed)."""
    for line in missed:
        print(f"MISSED {line}")
    print("all targets met" if not missed else f"{len(missed)} target(s) missed")
    return 1 if missed else 0
