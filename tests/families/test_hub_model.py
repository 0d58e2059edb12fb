"""End to end: a model served from the hub on first use, downloaded while /v1/models shows its progress.

The server starts with a local tiny Qwen3 as its default and the same model
as a repo id on a stand-in hub (``HF_ENDPOINT`` on 127.0.0.1, an empty
``HF_HOME``), paced so the download takes a few seconds: a streamed request
for the repo's model gets keep-alives while the files arrive, ``GET
/v1/models`` says ``downloading`` with the bytes done and due, and the answer
comes from the downloaded model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.stand_in_hub import stand_in_hub
from tests.server.conftest import start_server, stop_server

pytestmark = pytest.mark.e2e

REPO = "org/tiny-qwen3"


def test_a_repo_downloads_on_first_use_with_its_progress_shown(
    model_directories: dict[str, Path], tmp_path: Path
) -> None:
    local = model_directories["qwen3"]
    with stand_in_hub({REPO: local}) as hub:
        hub.seconds_per_chunk = 0.1  # 64 KiB every 0.1 s: a few seconds for the tiny weights
        environment = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        arguments = ["--model", f"main={local}", "--model", f"remote={REPO}", "--keepalive", "0.5"]
        server = start_server(tmp_path / "server.log", environment, arguments)
        try:
            body = {"model": "remote", "stream": True, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
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
        finally:
            stop_server(server)
    streamed = b"".join(received)
    assert b": keep-alive" in streamed and b"data: [DONE]" in streamed
    assert seen, "the model was listed as downloading"
    progress = [card["download"] for card in seen]
    assert all(0 <= item["done_bytes"] <= item["total_bytes"] for item in progress)
    assert progress[-1]["total_bytes"] >= sum(path.stat().st_size for path in local.glob("*.safetensors"))
    assert "Downloading org/tiny-qwen3 from http://127.0.0.1" in server.log_text()
