"""OpenAI embeddings requests, validated by pydantic and translated into the embeddings core's request."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from mlx_server.dialects.common import RequestBody
from mlx_server.embeddings.service import EmbeddingRequest

__all__ = ["EmbeddingsRequest"]

TokenIds = list[Annotated[int, Field(ge=0)]]
EmbeddingInput = Union[str, list[str], TokenIds, list[TokenIds]]


class EmbeddingsRequest(RequestBody):
    """POST /v1/embeddings: text, texts, token ids, or lists of token ids (the model's own vocabulary)."""

    input: EmbeddingInput
    model: str = "default"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def to_embedding_request(self) -> EmbeddingRequest:
        given = self.input
        inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
        if isinstance(given, str):
            inputs = (given,)
        elif all(isinstance(item, str) for item in given):
            inputs = tuple(str(item) for item in given)
        elif all(isinstance(item, int) for item in given):
            inputs = (tuple(int(item) for item in given if isinstance(item, int)),)
        else:
            inputs = tuple(tuple(item) for item in given if isinstance(item, list))
        return EmbeddingRequest(inputs, self.dimensions)
