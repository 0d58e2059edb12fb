"""The served models as the dialects see them: a name to route by, and each model's service (loaded on demand).

The pool that implements it (``pool.ModelPool``) is assembled at start-up and
handed to the application; the dialects know only this protocol.
"""

from __future__ import annotations

from typing import Protocol

from mlx_server.chat.service import ChatService
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.vocabulary import ModelStatus

__all__ = ["ModelDirectory"]


class ModelDirectory(Protocol):
    def chat_model(self, requested: str) -> str:
        """The chat model that answers a request naming ``requested``: by name, by alias, else the default.

        InvalidRequestError when ``requested`` is an embedding model.
        """
        ...

    def embedding_model(self, requested: str) -> str: ...

    def ready(self, name: str) -> ChatService | EmbeddingService | None:
        """The model's service if it is loaded now (None: ``chat`` or ``embeddings`` loads it)."""
        ...

    async def chat(self, name: str) -> ChatService:
        """The chat model's service, loading it first if needed (ModelUnavailableError when it cannot be)."""
        ...

    async def embeddings(self, name: str) -> EmbeddingService: ...

    def describe(self) -> list[ModelStatus]: ...

    async def load(self, name: str) -> ModelStatus: ...

    async def unload(self, name: str) -> ModelStatus: ...

    def keep_alive(self, name: str, seconds: float) -> None:
        """How long the model stays loaded once idle, as a client asked (``math.inf``: never unloaded for it)."""
        ...
