"""End to end: models served from the hub on first use, downloaded while their progress shows.

The server starts with a local tiny Qwen3 as its default and the same model
as two repo ids on a stand-in hub (``HF_ENDPOINT`` on 127.0.0.1, an empty
``HF_HOME``), paced so a download takes a few seconds.  A streamed request
for one repo's model gets keep-alives while the files arrive and ``GET
/v1/models`` says ``downloading`` with the bytes done and due; Ollama's
``/api/pull`` of the other reports the same progress in Ollama's events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from testbed.stand_in_hub import stand_in_hub
from tests.server.conftest import RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e

REPO, PULLED = "org/tiny-qwen3", "org/tiny-qwen3-pulled"


@pytest.fixture(scope="module")
def server(model_directories: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    local = model_directories["qwen3"]
    directory = tmp_path_factory.mktemp("hub")
    with stand_in_hub({REPO: local, PULLED: local}) as hub:
        hub.seconds_per_chunk = 0.01  # 64 KiB every 10 ms: a few seconds for the tiny model's weights
        environment = {"HF_ENDPOINT": hub.url, "HF_HOME": str(directory / "hf"), "HF_HUB_OFFLINE": "0"}
        arguments = ["--model", f"main={local}", "--model", f"remote={REPO}", "--model", f"pulled={PULLED}",
                     "--keepalive", "0.5"]  # fmt: skip
        running = start_server(directory / "server.log", environment, arguments)
        yield running
        stop_server(running)


def weights_bytes(model_directories: dict[str, Path]) -> int:
    return sum(path.stat().st_size for path in model_directories["qwen3"].glob("*.safetensors"))


def test_a_repo_downloads_on_first_use_with_its_progress_shown(
    server: RunningServer, model_directories: dict[str, Path]
) -> None:
    body = {"model": "remote", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    received: list[bytes] = []

    def ask() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=300) as reply:
            received.extend(reply.iter_raw())

    asking = threading.Thread(target=ask)
    asking.start()
    seen: list[dict[str, Any]] = []
    while asking.is_alive():
        cards = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
        seen += [card for card in cards if card["id"] == "remote" and card["state"] == "downloading"]
        time.sleep(0.2)
    asking.join()
    streamed = b"".join(received)
    assert b": keep-alive" in streamed and b"data: [DONE]" in streamed
    assert seen, "the model was listed as downloading"
    progress = [card["download"] for card in seen]
    assert all(0 <= item["done_bytes"] <= item["total_bytes"] for item in progress)
    assert progress[-1]["total_bytes"] >= weights_bytes(model_directories)
    assert f"Downloading {REPO} from http://127.0.0.1" in server.log_text()


def test_an_ollama_pull_reports_the_download(server: RunningServer, model_directories: dict[str, Path]) -> None:
    events = list(ollama.Client(host=server.base_url).pull("pulled", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    downloading = [event for event in events if event.total]
    assert downloading and all((event.completed or 0) <= (event.total or 0) for event in downloading)
    assert downloading[-1].total and downloading[-1].total >= weights_bytes(model_directories)
    cards = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
    assert [card["state"] for card in cards if card["id"] == "pulled"] == ["loaded"]
