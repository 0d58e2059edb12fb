"""The served models: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /models/load`` and ``/models/unload``.

The listing answers in OpenAI's shape or, when the client sends
``anthropic-version``, in Anthropic's (so both SDKs' ``models.list()`` and
``models.retrieve()`` work); each entry also says the model's kind (chat or
embedding), its state (downloading, with its bytes done and due, loading, loaded,
unloading, unloaded), the memory it
takes and its aliases.  Any other id is answered as the model a request
naming it would reach (the generation routes accept any model name).  Loading
and unloading take ``{"model": NAME}`` as llama-server's router does.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from fastapi import APIRouter, Request

from mlx_server.dialects.common import DialectModel
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.vocabulary import ModelStatus, NotFoundError

__all__ = ["LOAD_PATH", "UNLOAD_PATH", "build_router"]

LOAD_PATH = "/models/load"
UNLOAD_PATH = "/models/unload"


class ModelAction(DialectModel):
    model: str


def build_router(models: ModelDirectory, started_at_monotonic: float) -> APIRouter:
    router = APIRouter()
    created = int(time.time() - (time.monotonic() - started_at_monotonic))

    def details(status: ModelStatus) -> dict[str, Any]:
        described: dict[str, Any] = {
            "kind": status.kind,
            "state": status.state,
            "memory_bytes": status.memory_bytes,
            "aliases": list(status.aliases),
            "pinned": status.pinned,
        }
        if status.download is not None:
            described["download"] = {"done_bytes": status.download[0], "total_bytes": status.download[1]}
        return described | ({"error": status.failure} if status.failure else {})

    def openai_card(model_id: str, status: ModelStatus) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-server", **details(status)}

    def anthropic_card(model_id: str, status: ModelStatus) -> dict[str, Any]:
        created_at = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
        return {
            "type": "model",
            "id": model_id,
            "display_name": status.name,
            "created_at": created_at.isoformat().replace("+00:00", "Z"),
        }

    def wants_anthropic(request: Request) -> bool:
        return "anthropic-version" in request.headers

    def status_of(name: str) -> ModelStatus:
        for status in models.describe():
            if status.name == name:
                return status
        raise NotFoundError(f"no model named {name!r} is served here", "model", "model_not_found")

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        statuses = models.describe()
        if wants_anthropic(request):
            cards = [anthropic_card(status.name, status) for status in statuses]
            return {"data": cards, "has_more": False, "first_id": cards[0]["id"], "last_id": cards[-1]["id"]}
        return {"object": "list", "data": [openai_card(status.name, status) for status in statuses]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        names = {status.name for status in models.describe()}
        served = model_id if model_id in names else models.chat_model(model_id)
        status = status_of(served)
        return anthropic_card(model_id, status) if wants_anthropic(request) else openai_card(model_id, status)

    @router.post(LOAD_PATH)
    async def load(body: ModelAction) -> dict[str, Any]:
        status_of(body.model)
        return openai_card(body.model, await models.load(body.model))

    @router.post(UNLOAD_PATH)
    async def unload(body: ModelAction) -> dict[str, Any]:
        status_of(body.model)
        return openai_card(body.model, await models.unload(body.model))

    return router
