"""Unexpected failures: a 500 in the route's shape with a redacted debug file, and the loading state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import utils_logging
from mlx_server.blas import BlasInfo
from mlx_server.chat.prompts import ChatTemplate
from mlx_server.edge.app import ServerState, create_app
from mlx_server.settings import Settings

from .scripted import scripted_server

SECRET = "sk-ant-api03-failuresecret0000"
BODY = {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture
def client() -> TestClient:
    return scripted_server().client


def _explode(*_arguments: object) -> Any:
    raise RuntimeError(f"tokenizer exploded near {SECRET}")


class TestUnexpectedErrors:
    def test_500_with_debug_file_when_debugging(
        self, client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """The client gets a 500 with no traceback; the debug file holds the redacted request."""
        monkeypatch.setenv("ANYCLAUDE_DEBUG_DIR", str(tmp_path))
        monkeypatch.setattr(ChatTemplate, "render", _explode)
        utils_logging.set_debug_level(1)
        try:
            response = client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {SECRET}"})
        finally:
            utils_logging.set_debug_level(0)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "Traceback" not in response.text
        assert SECRET not in response.text
        assert "/" not in error["debug_file"], "the body names the file, not a server path"
        debug_file = tmp_path / error["debug_file"]
        document = json.loads(debug_file.read_text())
        assert document["status_code"] == 500
        assert document["request"]["headers"]["authorization"] == "[REDACTED]"
        assert json.loads(document["request"]["body"])["messages"][0]["content"] == "Hello"
        assert SECRET not in debug_file.read_text()

    def test_no_file_path_when_not_debugging(self, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """With debugging off the 500 names no file."""
        monkeypatch.setattr(ChatTemplate, "render", _explode)
        response = client.post("/v1/chat/completions", json=BODY)
        assert response.status_code == 500
        assert "debug_file" not in response.json()["error"]

    def test_server_keeps_serving(self, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
        """After a failure the next request is answered normally."""
        with monkeypatch.context() as patch:
            patch.setattr(ChatTemplate, "render", _explode)
            assert client.post("/v1/chat/completions", json=BODY).status_code == 500
        response = client.post("/v1/chat/completions", json=BODY)
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] >= 1


class TestLoadingState:
    def test_health_and_chat_answer_503_while_loading(self) -> None:
        """Before the engine exists, /health and the API say the model is loading."""
        state = ServerState(settings=Settings(), blas=BlasInfo("test", None, optimized=False))
        client = TestClient(create_app(state), base_url="http://localhost")
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        chat = client.post("/v1/chat/completions", json=BODY)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_loading"

    def test_anthropic_route_answers_overloaded_while_loading(self) -> None:
        """Claude Code retries a 529 overloaded_error, so that is what the loading model says on its route."""
        state = ServerState(settings=Settings(), blas=BlasInfo("test", None, optimized=False))
        client = TestClient(create_app(state), base_url="http://localhost")
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
        response = client.post("/v1/messages", json=body)
        assert response.status_code == 529
        assert response.json() == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "the model is still loading; retry shortly"},
        }
        assert client.head("/").status_code == 200
