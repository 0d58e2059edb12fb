"""``POST /v1/embeddings``: OpenAI's embeddings over an embedding model, routed by the request's model.

Each input's vector comes back as a list of floats or, with
``encoding_format: base64``, as the base64 of its little-endian float32
bytes (what the ``openai`` SDK asks for by default); ``usage`` counts the
inputs' tokens.  A client that hangs up cancels the route, and with it the work.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.openai_embeddings_protocol import EmbeddingsRequest
from mlx_server.dialects.streaming import with_cancellation

__all__ = ["EMBEDDINGS_PATH", "build_router"]

EMBEDDINGS_PATH = "/v1/embeddings"


def _encoded(vector: np.ndarray[Any, Any], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def build_router(models: ModelDirectory) -> APIRouter:
    router = APIRouter()

    @router.post(EMBEDDINGS_PATH)
    @with_cancellation
    async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
        name = models.embedding_model(body.model)
        service = await models.embeddings(name)
        result = await service.embed(body.to_embedding_request())
        data = [
            {"object": "embedding", "index": index, "embedding": _encoded(vector, body.encoding_format)}
            for index, vector in enumerate(result.vectors)
        ]
        usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
        return {"object": "list", "data": data, "model": name, "usage": usage}

    return router
