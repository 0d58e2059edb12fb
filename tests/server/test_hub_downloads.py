"""Models from the hub: downloaded when not cached, resumed, refused with a sentence; never the internet.

A stand-in hub on 127.0.0.1 (``testbed/stand_in_hub.py``) serves a repo the
way the hub does, and huggingface_hub is pointed at it and at an empty cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from mlx_server.model import hub
from mlx_server.model.hub import HubError, fetch
from testbed.stand_in_hub import StandInHub, stand_in_hub

REPO = "org/tiny"
WEIGHTS = 256 * 2400


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A model directory as a repo holds it: what MLX reads, and code and other weights it must not fetch."""
    directory = tmp_path / "repo"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "qwen3"}')
    (directory / "tokenizer.json").write_text('{"model": {}}')
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * (WEIGHTS // 256))
    (directory / "modeling_tiny.py").write_text("raise SystemExit('never run')")
    (directory / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    return directory


@pytest.fixture
def hub_at(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """The stand-in hub serving ``REPO``, huggingface_hub pointed at it, an empty cache, online."""
    with stand_in_hub({REPO: repo}) as served:
        monkeypatch.setattr(constants, "ENDPOINT", served.url)  # read at import, as HF_ENDPOINT is
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", served.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        hub.set_offline(False)
        yield served
    hub.set_offline(False)


def gets(served: StandInHub) -> list[str]:
    return [path for method, path, _ in served.requests if method == "GET" and "/resolve/" in path]


def test_a_repo_not_in_the_cache_is_downloaded_with_only_what_mlx_reads(hub_at: StandInHub, repo: Path) -> None:
    snapshot = fetch(REPO)
    assert sorted(path.name for path in snapshot.iterdir()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]  # fmt: skip
    assert (snapshot / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    asked = len(hub_at.requests)
    assert fetch(REPO) == snapshot and len(hub_at.requests) == asked, "a cached repo asks the hub nothing"


def test_a_dropped_connection_is_resumed(hub_at: StandInHub, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What arrived before the connection dropped is kept (written in 64 KiB pieces here, 10 MB on the hub)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 65536)
    hub_at.drop_once.add("model.safetensors")
    snapshot = fetch(REPO)  # huggingface_hub retries the file from where it stopped
    assert (snapshot / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    ranges = [asked for _, path, asked in hub_at.requests if path.endswith("model.safetensors") and asked]
    assert ranges and ranges[-1].startswith("bytes=") and not ranges[-1].startswith("bytes=0-"), ranges


def test_a_repo_the_hub_does_not_have_is_a_sentence(hub_at: StandInHub) -> None:
    with pytest.raises(HubError, match=rf"model 'org/nothing' was not found on {hub_at.url}: check the repo id"):
        fetch("org/nothing")


def test_offline_the_cache_is_all_there_is(hub_at: StandInHub) -> None:
    hub.set_offline(True)
    with pytest.raises(HubError, match="not in the Hugging Face cache and this server is offline"):
        fetch(REPO)
    assert not hub_at.requests, "offline, nothing is asked"
    hub.set_offline(False)
    snapshot = fetch(REPO)
    hub.set_offline(True)
    assert fetch(REPO) == snapshot


def test_the_disk_space_is_checked_before_any_byte(hub_at: StandInHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_free_bytes", lambda _directory: 1000)
    with pytest.raises(HubError, match=r"needs 0\.6 MiB of disk .* cache has only 0\.0 MiB free"):
        fetch(REPO)
    assert not gets(hub_at)


def test_a_download_in_progress_says_how_far_it_is(hub_at: StandInHub) -> None:
    hub_at.seconds_per_chunk = 0.05
    done: list[Path] = []
    worker = threading.Thread(target=lambda: done.append(fetch(REPO)))
    worker.start()
    seen = []
    while worker.is_alive():
        progress = hub.downloading(REPO)
        if progress is not None:
            seen.append((progress.done_bytes, progress.total_bytes))
        time.sleep(0.02)
    worker.join()
    assert done and hub.downloading(REPO) is None
    assert seen and all(total >= WEIGHTS for _, total in seen)
    assert any(0 < done_bytes < total for done_bytes, total in seen), "bytes counted as they arrive"
