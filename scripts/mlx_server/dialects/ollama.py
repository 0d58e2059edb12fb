"""Ollama's API (``/api/*``), for the apps that reach local models only through it.

``/api/chat`` and ``/api/generate`` go through the same chat core as every
dialect (engine, prompt cache, lanes, grammars): replies stream as NDJSON, one
JSON object per line (Ollama streams unless ``stream`` is false), the last
with ``done: true``, the reason and the counts and durations (nanoseconds).
A call arrives whole, its arguments an object, as Ollama sends it.  A request
with no messages (no prompt) loads the model, or unloads it with
``keep_alive: 0``, under the same policy as ``/models/unload``.  ``/api/tags``,
``/api/ps`` and ``/api/show`` describe the served models (``/api/show`` reads a
loaded model's context length and capabilities; it loads nothing);
``/api/embed`` and the older ``/api/embeddings`` embed; ``/api/pull`` loads a
served model, downloading it from the hub when it is not cached, with Ollama's
progress events (the policy of ``/models/load``).  Errors are Ollama's
``{"error": "..."}`` with the status every other dialect gives.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from mlx_server.chat.events import Completion, ReasoningDelta, Started, TextDelta, ToolCallDelta
from mlx_server.chat.service import ChatService
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.errors import APIError, http_error
from mlx_server.dialects.lanes import lane_of_headers
from mlx_server.dialects.ollama_protocol import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaModelRequest,
    keep_alive_seconds,
    served_name,
)
from mlx_server.dialects.streaming import Delta, serve_chat, with_cancellation
from mlx_server.embeddings.service import EmbeddingRequest
from mlx_server.vocabulary import ForbiddenError, ModelStatus, NotFoundError, ServerError, ToolCall
from utils_logging import debug

__all__ = [
    "API_VERSION",
    "DESCRIBING_PATHS",
    "ERROR_PATH_PREFIX",
    "GENERATION_PATHS",
    "NDJSON",
    "build_router",
    "ollama_error",
]

ERROR_PATH_PREFIX = "/api/"
CHAT_PATH, GENERATE_PATH, EMBED_PATH, EMBEDDINGS_PATH = "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"
GENERATION_PATHS = frozenset({CHAT_PATH, GENERATE_PATH, EMBED_PATH, EMBEDDINGS_PATH})
DESCRIBING_PATHS = frozenset({"/api/version", "/api/tags", "/api/ps", "/api/show", "/api/pull"})
PULL_POLL_SECONDS = 0.5
NDJSON = "application/x-ndjson"
API_VERSION = "0.12.6"  # the Ollama release whose API this follows; apps gate features on it

NEVER = "0001-01-01T00:00:00Z"  # Go's zero time: what Ollama says of a model that never expires
ModelControl = Callable[[Request], "str | None"]
"""Why this request may not load or unload models (None: it may): the policy of /models/load and /unload."""


def ollama_error(error: APIError) -> tuple[int, dict[str, Any]]:
    return error.status, {"error": error.message}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _ollama_call(index: int, call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {"input": call.arguments}
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _digest(status: ModelStatus) -> str:
    return hashlib.sha256(f"{status.name}:{status.source}".encode()).hexdigest()


class _Reply:
    """One reply in Ollama's shape, a chat message or a generated ``response``; streamed as NDJSON lines."""

    keepalive = b""  # never sent: an NDJSON line must be an object (the routes run without keep-alives)
    media_type = NDJSON

    def __init__(self, chat: bool, arrived: float, model: str) -> None:
        self.chat = chat
        self.arrived = arrived
        self.model = _tagged(model)

    def body(self, content: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = content
            if thinking:
                body["thinking"] = thinking
        return body

    def _done(self, body: dict[str, Any], completion: Completion) -> dict[str, Any]:
        stats, usage = completion.stats, completion.usage
        first_token_ns = int(stats.time_to_first_token_ms * 1e6)
        body |= {
            "done": True,
            "done_reason": "length" if completion.finish_reason == "length" else "stop",
            "total_duration": int((time.monotonic() - self.arrived) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": usage.prompt.prompt_tokens,
            "prompt_eval_duration": first_token_ns,
            "eval_count": usage.completion_tokens,
            "eval_duration": max(int(stats.generation_ms * 1e6) - first_token_ns, 0),
        }
        return body

    def whole(self, completion: Completion) -> dict[str, Any]:
        calls = [_ollama_call(index, call) for index, call in enumerate(completion.tool_calls)]
        return self._done(self.body(completion.text, completion.reasoning, calls), completion)

    def start(self, started: Started) -> list[bytes]:
        return []

    def delta(self, delta: Delta) -> list[bytes]:
        if isinstance(delta, TextDelta):
            return [_line(self.body(delta.text) | {"done": False})]
        if isinstance(delta, ReasoningDelta):
            return [_line(self.body(thinking=delta.text) | {"done": False})]
        if isinstance(delta, ToolCallDelta) and self.chat:
            return [_line(self.body(calls=[_ollama_call(delta.index, delta.call)]) | {"done": False})]
        return []  # a call's start and argument pieces: Ollama sends a call whole

    def finish(self, completion: Completion) -> list[bytes]:
        return [_line(self._done(self.body(), completion))]

    def error(self, error: APIError) -> list[bytes]:
        return [_line({"error": error.message})]


def build_router(models: ModelDirectory, model_control: ModelControl) -> APIRouter:
    router = APIRouter()

    def status_of_known(name: str) -> ModelStatus | None:
        return next((status for status in models.describe() if status.name == name), None)

    def status_of(name: str) -> ModelStatus:
        status = status_of_known(name)
        if status is None:
            raise NotFoundError(f"model '{name}' not found", "model", "model_not_found")
        return status

    def details(status: ModelStatus) -> dict[str, Any]:
        ready = models.ready(status.name)
        info = ready.report().info if isinstance(ready, ChatService) else {}
        family = str(info.get("model_kind") or "")
        quantization = "quantized" if info.get("quantized") else ("" if not info else "unquantized")
        return {"parent_model": "", "format": "mlx", "family": family, "families": [family] if family else [],
                "parameter_size": "", "quantization_level": quantization}  # fmt: skip

    def card(status: ModelStatus) -> dict[str, Any]:
        return {"name": _tagged(status.name), "model": _tagged(status.name), "modified_at": _now(),
                "size": status.memory_bytes, "digest": _digest(status), "details": details(status)}  # fmt: skip

    def capabilities(status: ModelStatus) -> tuple[list[str], dict[str, Any]]:
        """What the model can do, and Ollama's ``model_info`` (architecture, context length) once it is loaded."""
        if status.kind == "embedding":
            return ["embedding"], {}
        found = ["completion", "tools"]  # every chat model here takes tools (in its own call format, or Hermes)
        ready = models.ready(status.name)
        if not isinstance(ready, ChatService):
            return found, {}
        profile = ready.profile
        if profile.images is not None:
            found.append("vision")
        if profile.thinking.switch or profile.thinking.levels or profile.harmony:
            found.append("thinking")
        architecture = str(ready.report().info.get("model_kind") or "mlx")
        info = {"general.architecture": architecture, f"{architecture}.context_length": profile.context_length}
        return found, info

    def context_length(status: ModelStatus) -> int:
        ready = models.ready(status.name)
        return ready.profile.context_length if isinstance(ready, ChatService) else 0

    async def controlled(request: Request, name: str, unload: bool) -> ModelStatus:
        refusal = model_control(request)
        if refusal is not None:
            raise ForbiddenError(refusal, "keep_alive", "model_control_refused")
        return await (models.unload(name) if unload else models.load(name))

    async def generate(body: OllamaChatRequest | OllamaGenerateRequest, request: Request, empty: bool) -> Response:
        arrived = time.monotonic()
        chat = isinstance(body, OllamaChatRequest)
        name = models.chat_model(served_name(body.model))
        if empty:
            unload = keep_alive_seconds(body.keep_alive) == 0
            await controlled(request, name, unload)
            reply = _Reply(chat, arrived, name).body() | {"done": True, "done_reason": "unload" if unload else "load"}
            return Response(_line(reply), media_type="application/json")
        chat_request = body.to_chat_request(lane_of_headers(request.headers))
        keep = keep_alive_seconds(body.keep_alive)
        if keep is not None:
            refusal = model_control(request)
            if refusal is None:
                models.keep_alive(name, keep)
            else:
                debug(1, "keep_alive left as configured", {"model": name, "why": refusal})
        reply_for = functools.partial(_Reply, chat, arrived)
        return await serve_chat(models, name, chat_request, body.stream, reply_for, 0.0)

    @router.get("/api/version")
    async def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [card(status) for status in models.describe()]}

    @router.get("/api/ps")
    async def running() -> dict[str, Any]:
        loaded = [status for status in models.describe() if status.state == "loaded"]
        return {"models": [card(status) | {"expires_at": NEVER, "size_vram": status.memory_bytes,
                                           "context_length": context_length(status)}
                           for status in loaded]}  # fmt: skip

    @router.post("/api/show")
    async def show(body: OllamaModelRequest) -> dict[str, Any]:
        status = status_of(body.named())
        found, info = capabilities(status)
        return {"modelfile": "", "parameters": "", "template": "", "details": details(status), "model_info": info,
                "capabilities": found, "modified_at": _now()}  # fmt: skip

    @router.post("/api/pull", response_model=None)
    async def pull(body: OllamaModelRequest, request: Request) -> Response:
        """A served model loaded, downloaded first when it is not cached; its progress as Ollama's events."""
        name = body.named()
        if status_of_known(name) is None:
            raise NotFoundError(f"model '{name}' is not served here: start the server with --model {name}=REPO_ID",
                                "model", "model_not_found")  # fmt: skip
        loading = asyncio.ensure_future(controlled(request, name, unload=False))
        if not body.stream:
            await loading
            return Response(_line({"status": "success"}), media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            yield _line({"status": "pulling manifest"})
            try:
                while not loading.done():
                    await asyncio.wait((loading,), timeout=PULL_POLL_SECONDS)
                    status = status_of(name)
                    if status.download is not None:
                        digest = _digest(status)
                        done, total = status.download
                        yield _line({"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                                     "total": total, "completed": done})  # fmt: skip
                loading.result()
            except ServerError as error:
                yield _line({"error": http_error(error).message})
                return
            finally:
                if not loading.done():
                    loading.cancel()
            yield _line({"status": "success"})

        return StreamingResponse(events(), media_type=NDJSON)

    @router.post(CHAT_PATH, response_model=None)
    @with_cancellation
    async def chat(body: OllamaChatRequest, request: Request) -> Response:
        return await generate(body, request, empty=not body.messages)

    @router.post(GENERATE_PATH, response_model=None)
    @with_cancellation
    async def generate_route(body: OllamaGenerateRequest, request: Request) -> Response:
        return await generate(body, request, empty=not body.prompt and not body.images)

    @router.post(EMBED_PATH)
    @with_cancellation
    async def embed(body: OllamaEmbedRequest, request: Request) -> dict[str, Any]:
        arrived = time.monotonic()
        name = models.embedding_model(served_name(body.model))
        result = await (await models.embeddings(name)).embed(body.to_embedding_request())
        return {"model": _tagged(name), "embeddings": result.vectors.tolist(),
                "total_duration": int((time.monotonic() - arrived) * 1e9), "load_duration": 0,
                "prompt_eval_count": result.prompt_tokens}  # fmt: skip

    @router.post(EMBEDDINGS_PATH)
    @with_cancellation
    async def embeddings(body: OllamaEmbeddingsRequest, request: Request) -> dict[str, Any]:
        name = models.embedding_model(served_name(body.model))
        result = await (await models.embeddings(name)).embed(EmbeddingRequest((body.prompt,), truncate=True))
        return {"embedding": result.vectors[0].tolist()}

    return router
