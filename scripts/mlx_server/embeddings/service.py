"""One embedding model's requests: inputs checked and tokenized, vectors cut to the asked dimensions.

Inputs come as text (tokenized with the model's own tokenizer, off the event
loop) or as token ids of the model's own vocabulary (as vLLM takes them).
An empty input list, an empty input, an id outside the vocabulary, an input
longer than the model's context, more than ``MAX_INPUTS`` inputs (OpenAI's
limit) or more tokens in all than the server's ``max_tokens`` is a clear
error naming the input; the inputs are counted before anything is
tokenized, and tokenizing stops as soon as the budget is spent.
``dimensions`` keeps the first components and scales the vector back to
length 1, as Matryoshka models are trained to allow.  The vectors come from
the model's engine (``vocabulary.Embedder``), which runs concurrent requests
together and drops the work of a request whose client went away.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_server.vocabulary import ContextOverflowError, Embedder, InvalidRequestError

__all__ = ["DEFAULT_MAX_TOKENS", "MAX_INPUTS", "EmbeddingRequest", "EmbeddingService", "Embeddings"]

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
DEFAULT_MAX_TOKENS = 300_000  # OpenAI's limit on one request's tokens (the server's --max-embedding-tokens)


@dataclass(frozen=True)
class EmbeddingRequest:
    """Texts, or token id lists; ``dimensions`` cuts each vector to that many components (None: all).

    ``truncate`` embeds the start of an input longer than the model's context (Ollama's default) instead of
    refusing it (OpenAI's).
    """

    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    dimensions: int | None = None
    truncate: bool = False


@dataclass(frozen=True)
class Embeddings:
    """One float32 row per input, in order, and how many tokens the inputs took."""

    vectors: np.ndarray[Any, np.dtype[np.float32]]
    prompt_tokens: int


class EmbeddingService:
    """Answers ``EmbeddingRequest`` values with one model's engine; ``in_flight`` counts requests being answered."""

    def __init__(self, name: str, engine: Embedder, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.name = name
        self.engine = engine
        self.max_tokens = max_tokens
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
        if len(request.inputs) > MAX_INPUTS:
            raise InvalidRequestError(
                f"input holds {len(request.inputs)} inputs; at most {MAX_INPUTS} are embedded in one request",
                "input",
                "too_many_inputs",
            )
        rows: list[list[int]] = []
        total = 0
        for index, item in enumerate(request.inputs):
            param = f"input[{index}]" if len(request.inputs) > 1 else "input"
            row = self._encode(item) if isinstance(item, str) else [token for token in item if isinstance(token, int)]
            if not row:
                raise InvalidRequestError(f"{param} is empty: every input needs at least one token", param)
            if any(not 0 <= token < self.vocabulary_size for token in row):
                raise InvalidRequestError(f"{param}: token ids must be in [0, {self.vocabulary_size})", param)
            if len(row) > self.context_length and request.truncate:
                row = row[: self.context_length]
            if len(row) > self.context_length:
                raise ContextOverflowError(self.context_length, len(row), None, param)
            total += len(row)
            if total > self.max_tokens:
                raise InvalidRequestError(
                    f"the inputs hold more than {self.max_tokens} tokens, more than this server embeds in one "
                    "request (--max-embedding-tokens): send them in several requests",
                    "input",
                    "too_many_tokens",
                )
            rows.append(row)
        if request.dimensions is not None and not 1 <= request.dimensions <= self.engine.dimensions:
            raise InvalidRequestError(
                f"dimensions must be between 1 and this model's {self.engine.dimensions}", "dimensions"
            )
        return rows

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """The request's vectors (cancelling the awaiting task drops its work in the engine)."""
        rows = await asyncio.to_thread(self.tokens, request)
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
