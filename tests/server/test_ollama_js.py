"""The official Ollama JavaScript client (npm ``ollama``, pinned in tools/ollama-js) against the server's /api routes.

Each step runs ``node tests/server/js/ollama_client.mjs`` against the scripted
models over real HTTP and prints what the client parsed, as JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings

from .conftest import ROOT
from .scripted import ScriptedModels, scripted_models, served_over_http

CLIENT = Path(__file__).parent / "js" / "ollama_client.mjs"
PACKAGE = ROOT / "tools" / "ollama-js" / "node_modules" / "ollama"
REGISTRY = Registry((ModelSpec("chat", None), ModelSpec("embed", "/m/embed", "embedding")))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ScriptedModels, str]]:
    assert PACKAGE.is_dir(), "make test installs the ollama npm package (make ollama-js)"
    models = scripted_models(REGISTRY, Settings(default_temperature=0.0, response_cache_size=0))
    with served_over_http(models) as base_url:
        yield models, base_url


def step(base_url: str, name: str) -> Any:
    node = shutil.which("node")
    assert node is not None, "make test needs Node.js"
    done = subprocess.run([node, str(CLIENT), str(PACKAGE), base_url, name], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_models_are_listed_and_shown(served: tuple[ScriptedModels, str]) -> None:
    _, base_url = served
    assert sorted(step(base_url, "list")) == ["chat:latest", "embed:latest"]
    shown = step(base_url, "show")
    assert {"completion", "tools"} <= set(shown["capabilities"])
    assert any(key.endswith(".context_length") for key in shown["info"])
    assert step(base_url, "missing") == {"status": 404, "error": "model 'no-such-model' not found"}


def test_a_chat_whole_and_streamed(served: tuple[ScriptedModels, str]) -> None:
    models, base_url = served
    models.engine("chat").reply("Hello from JS.", "Hello from JS.")
    whole = step(base_url, "chat")
    assert whole["content"] == "Hello from JS." and whole["done"] and whole["reason"] == "stop" and whole["eval"]
    parts = step(base_url, "stream")
    assert "".join(part["content"] for part in parts) == "Hello from JS." and parts[-1]["done"]


def test_a_tool_call_and_embeddings(served: tuple[ScriptedModels, str]) -> None:
    models, base_url = served
    models.engine("chat").reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>')
    assert step(base_url, "tools") == [{"index": 0, "name": "get_weather", "arguments": {"city": "Lima"}}]
    assert step(base_url, "embed") == 2
