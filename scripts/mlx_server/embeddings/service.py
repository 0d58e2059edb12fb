"""One embedding model's requests: inputs checked and tokenized, vectors cut to the asked dimensions.

Inputs come as text (tokenized with the model's own tokenizer) or as token
ids of the model's own vocabulary (as vLLM takes them).  An empty input list,
an empty input, an id outside the vocabulary, or an input longer than the
model's context is a clear error naming the input; ``dimensions`` keeps the
first components and scales the vector back to length 1, as Matryoshka
models are trained to allow.  The vectors come from the model's engine
(``vocabulary.Embedder``), which runs concurrent requests together.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_server.vocabulary import ContextOverflowError, Embedder, InvalidRequestError

__all__ = ["EmbeddingRequest", "EmbeddingService", "Embeddings"]


@dataclass(frozen=True)
class EmbeddingRequest:
    """Texts, or token id lists; ``dimensions`` cuts each vector to that many components (None: all)."""

    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    dimensions: int | None = None


@dataclass(frozen=True)
class Embeddings:
    """One float32 row per input, in order, and how many tokens the inputs took."""

    vectors: np.ndarray[Any, np.dtype[np.float32]]
    prompt_tokens: int


class EmbeddingService:
    """Answers ``EmbeddingRequest`` values with one model's engine; ``in_flight`` counts requests being answered."""

    def __init__(self, name: str, engine: Embedder) -> None:
        self.name = name
        self.engine = engine
        self.vocabulary_size = len(engine.tokenizer.get_vocab())
        self._lock = threading.Lock()
        self.in_flight = 0

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def tokens(self, request: EmbeddingRequest) -> list[list[int]]:
        """Each input's token ids, checked (InvalidRequestError or ContextOverflowError naming the input)."""
        if not request.inputs:
            raise InvalidRequestError(
                "input must not be empty: send a string, a list of strings, or token ids", "input"
            )
        rows: list[list[int]] = []
        for index, item in enumerate(request.inputs):
            param = f"input[{index}]" if len(request.inputs) > 1 else "input"
            row = self._encode(item) if isinstance(item, str) else [token for token in item if isinstance(token, int)]
            if not row:
                raise InvalidRequestError(f"{param} is empty: every input needs at least one token", param)
            if any(not 0 <= token < self.vocabulary_size for token in row):
                raise InvalidRequestError(f"{param}: token ids must be in [0, {self.vocabulary_size})", param)
            if len(row) > self.context_length:
                raise ContextOverflowError(self.context_length, len(row), None, param)
            rows.append(row)
        if request.dimensions is not None and not 1 <= request.dimensions <= self.engine.dimensions:
            raise InvalidRequestError(
                f"dimensions must be between 1 and this model's {self.engine.dimensions}", "dimensions"
            )
        return rows

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        rows = self.tokens(request)
        with self._lock:
            self.in_flight += 1
        try:
            vectors = np.asarray(await self.engine.embed(rows), dtype=np.float32)
        finally:
            with self._lock:
                self.in_flight -= 1
        if request.dimensions is not None and request.dimensions < vectors.shape[1]:
            vectors = _renormalized(vectors[:, : request.dimensions])
        return Embeddings(vectors, sum(len(row) for row in rows))

    def busy(self) -> bool:
        return self.in_flight > 0 or self.engine.busy()

    def _encode(self, text: str) -> list[int]:
        encoded: Sequence[int] = self.engine.tokenizer.encode(text)
        return [int(token) for token in encoded]


def _renormalized(vectors: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray[Any, np.dtype[np.float32]]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: np.ndarray[Any, np.dtype[np.float32]] = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return result
