"""Checkpoints on disk (``--prompt-cache-dir``), so a restart starts warm.

Only checkpoints are saved (the stable prefix: system prompt and tools): they
are what every new conversation reuses, while conversation entries are
specific to one client's session.  Files are mlx-lm's ``save_prompt_cache``
format, named ``<model identity>-<token digest>.safetensors``, with the model
identity and the tokens in their metadata; at load, anything corrupt,
truncated or written for another model is skipped with a warning.  The
directory is kept within the cache's own count and byte bounds, newest first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

__all__ = ["CACHE_FILE_SUFFIX", "CheckpointFiles"]

logger = logging.getLogger("mlx")

CACHE_FILE_SUFFIX = ".safetensors"


class CheckpointFiles:
    """One model's checkpoint files in one directory (best effort: failures are warnings, never raised)."""

    def __init__(self, directory: Path, model_identity: str, max_files: int, max_bytes: int) -> None:
        self.directory = directory
        self._identity = model_identity
        self._max_files = max_files
        self._max_bytes = max_bytes

    def save(self, key: str, tokens: np.ndarray, cache: list[Any]) -> None:
        path = self.directory / f"{self._identity}-{key[:24]}{CACHE_FILE_SUFFIX}"
        metadata = {"model_identity": self._identity, "token_digest": key, "tokens": json.dumps(tokens.tolist())}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{CACHE_FILE_SUFFIX}")
            save_prompt_cache(str(temporary), cache, metadata)
            os.replace(temporary, path)
            self._bound()
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("Prompt cache: could not save %s: %s", path.name, error)

    def load(self, digest: Any) -> Iterator[tuple[list[int], list[Any]]]:
        """This model's saved checkpoints, oldest first, as (tokens, KV cache); ``digest`` checks the tokens."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob(f"*{CACHE_FILE_SUFFIX}"), key=lambda item: item.stat().st_mtime):
            if path.name.startswith(".") or not path.name.startswith(f"{self._identity}-"):
                continue  # a temporary file, or another model's cache: not ours to judge
            try:
                cache, metadata = load_prompt_cache(str(path), return_metadata=True)
                # MLX streams are per thread: evaluate now, or another thread cannot run the lazy load.
                mx.eval([layer.state for layer in cache])
                tokens = json.loads(metadata["tokens"])
                if metadata.get("model_identity") != self._identity or digest(tokens) != metadata.get("token_digest"):
                    raise ValueError("its metadata does not match this model or its tokens")
                if {getattr(layer, "offset", None) for layer in cache} != {len(tokens)}:
                    raise ValueError("its KV length does not match its tokens")
            except Exception as error:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                logger.warning("Prompt cache: skipped %s (%s: %s)", path.name, type(error).__name__, error)
                continue
            yield tokens, cache

    def _bound(self) -> None:
        """Keep the directory within the cache's count and byte bounds, newest files first."""
        files = sorted(
            self.directory.glob(f"*{CACHE_FILE_SUFFIX}"), key=lambda path: path.stat().st_mtime, reverse=True
        )
        total = 0
        for index, path in enumerate(files):
            total += path.stat().st_size
            if index >= self._max_files or total > self._max_bytes:
                path.unlink(missing_ok=True)
