"""The engine never dies silently: a failure fails the requests it held with a 500, and the next is served.

A tiny Qwen3 serves; a step, an admission or the scheduler is made to raise
on purpose.  What a client sees is the dialect's 500 (never a hang with only
keep-alives), and /health tells a worker that gave up from one that goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_server.model.loading import load_model
from testbed.serving import serve

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


class Once:
    """Raises the first time it is called, then does what it replaced."""

    def __init__(self, replaced: Any) -> None:
        self.replaced = replaced
        self.raised = False

    def __call__(self, *arguments: Any) -> Any:
        if not self.raised:
            self.raised = True
            raise RuntimeError("a fault made on purpose")
        return self.replaced(*arguments)


@pytest.fixture
def served(model_directories: dict[str, Path]) -> Iterator[tuple[Any, Any]]:
    engine, client = serve(load_model(str(model_directories["qwen3"])), 32)
    yield engine, client
    engine.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_step_that_raises_fails_its_requests_and_the_next_is_served(served: tuple[Any, Any], stream: bool) -> None:
    engine, client = served
    decoder = engine._core.decoder
    decoder.step = Once(decoder.step)
    failed = client.post("/v1/chat/completions", json={**BODY, "stream": stream})
    if stream:
        assert failed.status_code == 200 and '"code":"internal_error"' in failed.text  # the in-stream error event
    else:
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in failed.text
    assert client.post("/v1/chat/completions", json=BODY).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def test_an_admission_that_raises_fails_that_request_only(served: tuple[Any, Any]) -> None:
    engine, client = served
    decoder = engine._core.decoder
    decoder.admit = Once(decoder.admit)
    assert client.post("/v1/messages", json=BODY).status_code == 500
    assert client.post("/v1/messages", json=BODY).status_code == 200


def test_a_worker_that_cannot_go_on_says_so_and_requests_get_503(served: tuple[Any, Any]) -> None:
    engine, client = served

    def broken(*_arguments: Any) -> Any:
        raise RuntimeError("the scheduler is broken on purpose")

    engine._scheduler.plan = broken
    first = client.post("/v1/chat/completions", json=BODY)
    assert first.status_code == 503 and first.json()["error"]["code"] == "model_unavailable"
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "the scheduler is broken on purpose" in health.json()["reason"]
    later = client.post("/v1/messages", json=BODY)
    assert later.status_code == 529 and later.json()["error"]["type"] == "overloaded_error"
