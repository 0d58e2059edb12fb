"""Models from the Hugging Face hub: the local cache first, else a download of what an MLX model needs.

huggingface_hub does the work (``HF_ENDPOINT``, ``HF_HOME``, ``HF_TOKEN``,
resuming an interrupted file with a range request); here is the policy: only
the files an MLX model reads (config, tokenizer and processor files, chat
templates, safetensors weights and their index), the disk space checked
before the first byte, a progress bar on a terminal and a line per file
(``ANYCLAUDE_DEBUG=1``) otherwise, and the bytes done and due kept for
``GET /v1/models`` while a model downloads.  Offline (``--offline`` or
``HF_HUB_OFFLINE=1``) nothing is fetched: a model that is not cached is refused
with a sentence.  A cached snapshot with an interrupted file is resumed when
online.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils_logging import debug

__all__ = ["ALLOWED_FILES", "Download", "HubError", "downloading", "fetch", "set_offline"]

logger = logging.getLogger("mlx")

ALLOWED_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
"""What an MLX model directory needs: config, tokenizer and processor files (``*.json``, sentencepiece
``*.model``, ``merges.txt``), chat templates and weights; never code (``*.py``) or other weight formats."""

_TRUE = ("1", "true", "yes", "on")


class HubError(RuntimeError):
    """A model the hub cannot give: the message says why and what to do."""


@dataclass
class Download:
    """A download in progress: what ``GET /v1/models`` shows of a model that is not on disk yet."""

    repo_id: str
    total_bytes: int
    files: int
    done_bytes: int = 0
    files_done: int = 0


_downloads: dict[str, Download] = {}
_lock = threading.Lock()
_offline = False


def set_offline(offline: bool) -> None:
    """``--offline``: fetch nothing, as ``HF_HUB_OFFLINE=1`` does."""
    global _offline
    _offline = offline


def is_offline() -> bool:
    return _offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def downloading(repo_id: str | None) -> Download | None:
    """The download of this repo in progress, if any."""
    with _lock:
        return _downloads.get(repo_id) if repo_id else None


def _bar_class(progress: Download) -> type[Any]:
    """huggingface_hub's progress bar, shown on a terminal only, that also counts into ``progress``."""
    from huggingface_hub.utils.tqdm import tqdm

    class CountingBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = kwargs.get("disable") or not sys.stderr.isatty()
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

        def update(self, n: float | None = 1) -> bool | None:
            with _lock:
                progress.done_bytes += int(n or 0)
            shown: bool | None = super().update(n)
            return shown

    return CountingBar


def _interrupted(snapshot: Path) -> bool:
    """Whether the repo's cache holds a file whose download was cut off (huggingface_hub resumes it)."""
    blobs = snapshot.parent.parent / "blobs"
    return blobs.is_dir() and any(blobs.glob("*.incomplete"))


def _free_bytes(directory: Path) -> int:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def fetch(repo_id: str) -> Path:
    """The repo's snapshot directory, downloaded first when it is not cached (HubError with a sentence)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=ALLOWED_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        snapshot = None
    except (OSError, ValueError) as error:
        raise HubError(f"{repo_id!r} is neither a file, a directory, nor a valid repo id ({error})") from error
    if snapshot is not None and (is_offline() or not _interrupted(snapshot)):
        return snapshot
    if is_offline():
        raise HubError(
            f"model {repo_id!r} is not in the Hugging Face cache and this server is offline (--offline or "
            f"HF_HUB_OFFLINE=1): download it first (hf download {repo_id}), or pass a .gguf file or MLX directory"
        )
    return _download(repo_id, Path(constants.HF_HUB_CACHE), constants.ENDPOINT)


def _download(repo_id: str, cache: Path, endpoint: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        files = snapshot_download(repo_id, allow_patterns=ALLOWED_FILES, dry_run=True)
    except (HfHubHTTPError, OSError) as error:
        cause = error.__cause__ or error  # a dry run reports the hub's answer as its cause
        if isinstance(cause, GatedRepoError):
            raise HubError(
                f"model {repo_id!r} is gated on {endpoint}: accept its terms there and set HF_TOKEN"
            ) from error
        if isinstance(cause, RepositoryNotFoundError):
            raise HubError(f"model {repo_id!r} was not found on {endpoint}: check the repo id (a private repo "
                           "needs HF_TOKEN)") from error  # fmt: skip
        raise HubError(
            f"model {repo_id!r} is not cached and the hub ({endpoint}) could not be reached ({type(cause).__name__}): "
            "connect, or download it elsewhere and copy the cache, or pass a .gguf file or MLX directory"
        ) from error
    due = [file for file in files if file.will_download]
    total = sum(file.file_size or 0 for file in due)
    free = _free_bytes(cache)
    if total > free:
        raise HubError(f"model {repo_id!r} needs {_size(total)} of disk for its files and the Hugging Face cache "
                       f"has only {_size(free)} free: free some space, or set HF_HOME to a larger disk")  # fmt: skip
    progress = Download(repo_id, total, len(due))
    with _lock:
        _downloads[repo_id] = progress
    started = time.monotonic()
    logger.info("Downloading %s from %s: %d files, %s", repo_id, endpoint, len(due), _size(total))
    try:
        for file in due:
            hf_hub_download(repo_id, file.filename, revision=file.commit_hash, tqdm_class=_bar_class(progress))
            with _lock:
                progress.files_done += 1
            debug(1, "Downloaded a model file", {"repo": repo_id, "file": file.filename, "bytes": file.file_size,
                                                 "done": f"{progress.files_done}/{progress.files}"})  # fmt: skip
    except (HfHubHTTPError, OSError) as error:
        logger.warning("The download of %s stopped: %s: %s", repo_id, type(error).__name__, error)
        raise HubError(f"the download of {repo_id!r} stopped ({type(error).__name__}); start again to resume it"
                       ) from error  # fmt: skip
    finally:
        with _lock:
            _downloads.pop(repo_id, None)
    logger.info("Downloaded %s (%s) in %.1fs", repo_id, _size(total), time.monotonic() - started)
    return _recorded_snapshot(repo_id, files[0].commit_hash if files else None)


def _recorded_snapshot(repo_id: str, commit: str | None) -> Path:
    """The downloaded snapshot, with the commit its revision resolved to recorded in the cache (``refs/main``), so
    that an offline start finds it.

    A snapshot over files already cached downloads nothing: it asks the hub for the tree once and records the
    revision (huggingface_hub's dry run did that too before 2.5).  When the hub cannot be asked just now, the
    commit's own snapshot is still returned.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOWED_FILES))
    except (HfHubHTTPError, OSError) as error:
        logger.warning("The hub could not be asked for %s's revision after its download: %s", repo_id, error)
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=ALLOWED_FILES, local_files_only=True))
