"""``GET /v1/models`` and ``GET /v1/models/{id}``, in OpenAI's shape or, when the client sends
``anthropic-version``, in Anthropic's (so both SDKs' ``models.list()`` and ``models.retrieve()`` work).

Any id is answered as the served model, as the generation routes accept and
echo any model name.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

__all__ = ["build_router"]


def build_router(served_model: Callable[[], str], started_at_monotonic: float) -> APIRouter:
    """``served_model`` returns the loaded model's name (ModelLoadingError while loading)."""
    router = APIRouter()
    created = int(time.time() - (time.monotonic() - started_at_monotonic))

    def openai_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-server"}

    def anthropic_card(model_id: str) -> dict[str, Any]:
        created_at = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
        return {
            "type": "model",
            "id": model_id,
            "display_name": served_model(),
            "created_at": created_at.isoformat().replace("+00:00", "Z"),
        }

    def wants_anthropic(request: Request) -> bool:
        return "anthropic-version" in request.headers

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        name = served_model()
        if wants_anthropic(request):
            return {"data": [anthropic_card(name)], "has_more": False, "first_id": name, "last_id": name}
        return {"object": "list", "data": [openai_card(name)]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        served_model()
        return anthropic_card(model_id) if wants_anthropic(request) else openai_card(model_id)

    return router
