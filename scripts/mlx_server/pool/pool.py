"""The models a server serves, as one pool: routing by name, loading on demand, unloading when idle, one budget.

Every model has its own engine (batch, prompt cache, speculation) and its own
profile, built by a ``Loader`` (``pool.loading`` loads real models; tests
give scripted ones).  The pool decides what is loaded:

* a request for a model that is not loaded loads it, and waits (a second
  request for it waits for the same load);
* a load that does not fit the memory budget first unloads idle, unpinned
  models (``memory.victims``: one used once before one that came back, then
  the least recently used); if it still cannot fit, the request gets
  ``ModelUnavailableError`` naming what is loaded and what was needed;
* a model loaded on demand stays at least ``min_residency`` seconds before
  another load may unload it (a request that needs its room waits, streams
  with keep-alives), so two models that do not fit together swap at most once
  per residency instead of on every alternate request;
* a load is checked first (the source exists, its size from its files, the
  local Hugging Face cache's included) before anything is unloaded for it; a
  model that fails to load is remembered, and requests for it are refused at
  once, with the reason, until its back-off passes (``RETRY_SECONDS``,
  doubling up to ``MAX_RETRY_SECONDS``) or an explicit ``load`` tries again;
* a model idle for its time-to-live unloads (``watch``); a pinned one never
  does, nor is it unloaded by request (``ConflictError``);
* unloading waits for the model's requests (at most ``DRAIN_SECONDS``), then
  ends the rest with ``ModelUnloadedError``, and saves its prompt cache's
  checkpoints when the cache has a directory, so a reload starts warm.

What a client reads of a failed load names no server path (the log does).

Everything here runs on the event loop; loads and unloads run in a thread,
one at a time (``_changing``), so the budget is never decided twice at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mlx_server.chat.service import ChatService
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.model.hub import downloading
from mlx_server.pool.memory import describe_bytes, victims
from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.server_paths import hide_server_paths
from mlx_server.vocabulary import (
    ConflictError,
    InvalidRequestError,
    ModelState,
    ModelStatus,
    ModelUnavailableError,
)
from utils_logging import debug

__all__ = ["DRAIN_SECONDS", "MAX_RETRY_SECONDS", "RETRY_SECONDS", "Loader", "ModelPool", "Served", "pool_of"]

logger = logging.getLogger("mlx")
DRAIN_SECONDS = 30.0  # an unload waits this long for the model's requests before ending them
WATCH_SECONDS = 1.0
RETRY_SECONDS = 30.0  # after a failed load, requests for the model are refused this long (doubling each time)
MAX_RETRY_SECONDS = 600.0


class Served(Protocol):
    """A loaded model, as its loader built it."""

    @property
    def service(self) -> ChatService | EmbeddingService: ...

    @property
    def memory_bytes(self) -> int:
        """Its weights and the KV memory it may use (its budget), counted against the pool's budget."""
        ...

    def busy(self) -> bool:
        """Whether a request is running or waiting in it."""
        ...

    def close(self, drain_seconds: float) -> None:
        """Stop it (blocking): wait for its requests, end the rest, save its prompt cache's checkpoints."""
        ...


class Loader(Protocol):
    def estimate(self, spec: ModelSpec) -> int:
        """The memory a load of ``spec`` will take, before loading (read from its files).

        ModelUnavailableError, with a sentence, when its source cannot be found: nothing is unloaded for it.
        """
        ...

    def load(self, spec: ModelSpec) -> Served:
        """Load ``spec`` (blocking); ModelUnavailableError with a sentence when it cannot be."""
        ...


@dataclass
class _Entry:
    spec: ModelSpec
    state: ModelState = "unloaded"
    served: Served | None = None
    loading: asyncio.Future[Served] | None = None
    last_used: float = 0.0
    uses: int = 0  # requests over the server's life: a model that came back is worth keeping
    resident_until: float = 0.0  # loaded on demand: not unloaded for another model before this
    failure: str | None = None  # why its last load failed (the whole reason, for the log)
    retry_at: float = 0.0  # requests before this are refused with the failure
    retry_seconds: float = 0.0  # the current back-off
    ttl: float | None = None  # a client's keep-alive (Ollama's keep_alive), over the configured time-to-live

    @property
    def time_to_live(self) -> float:
        return self.spec.ttl if self.ttl is None else self.ttl


class ModelPool:
    """The served models (see the module's docstring); ``budget_bytes`` bounds what is loaded at once."""

    def __init__(
        self,
        registry: Registry,
        loader: Loader,
        budget_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        fixed: str | None = None,
        min_residency: float = 0.0,
    ) -> None:
        self.registry = registry
        self.budget_bytes = budget_bytes
        self.min_residency = min_residency
        self._fixed = fixed  # why models may not be unloaded here (one model over several processes), or None
        self._loader = loader
        self._clock = clock
        self._entries = {spec.name: _Entry(spec) for spec in registry.models}
        self._changing = asyncio.Lock()
        self._on_load: list[Callable[[str, ChatService | EmbeddingService], None]] = []
        self._watcher: asyncio.Task[None] | None = None

    # -- routing ----------------------------------------------------------------------------------------

    def chat_model(self, requested: str) -> str:
        """The name of the chat model that answers a request for ``requested`` (see ``Registry.resolve``)."""
        return self.registry.resolve(requested, "chat").name

    def embedding_model(self, requested: str) -> str:
        return self.registry.resolve(requested, "embedding").name

    def ready(self, name: str) -> ChatService | EmbeddingService | None:
        """The service of a loaded model, or None (it must be loaded first: ``service``)."""
        entry = self._entries[name]
        if entry.state != "loaded" or entry.served is None:
            return None
        self._use(entry)
        return entry.served.service

    async def chat(self, name: str) -> ChatService:
        service = await self.service(name)
        assert isinstance(service, ChatService), f"{name} is a chat model"
        return service

    async def embeddings(self, name: str) -> EmbeddingService:
        service = await self.service(name)
        assert isinstance(service, EmbeddingService), f"{name} is an embedding model"
        return service

    async def service(self, name: str) -> ChatService | EmbeddingService:
        """The model's service, loading it first if needed (ModelUnavailableError when it cannot be)."""
        ready = self.ready(name)
        if ready is not None:
            return ready
        self._refuse_while_backing_off(self._entries[name])
        served = await self._load(self._entries[name])
        self._use(self._entries[name])
        return served.service

    def on_load(self, callback: Callable[[str, ChatService | EmbeddingService], None]) -> None:
        """Call ``callback(name, service)`` for every model loaded now and from now on (metrics hook in here)."""
        self._on_load.append(callback)
        for name, service in self.loaded().items():
            callback(name, service)

    # -- what is loaded ---------------------------------------------------------------------------------

    def describe(self) -> list[ModelStatus]:
        aliases: dict[str, list[str]] = {}
        for pattern, target in self.registry.aliases:
            aliases.setdefault(target, []).append(pattern)
        statuses = []
        for entry in self._entries.values():
            download = downloading(entry.spec.source) if entry.state != "loaded" else None
            statuses.append(ModelStatus(
                entry.spec.name,
                entry.spec.kind,
                "downloading" if download is not None else entry.state,
                entry.served.memory_bytes if entry.served is not None else 0,
                entry.spec.pinned,
                entry.time_to_live,
                tuple(aliases.get(entry.spec.name, ())),
                entry.spec.source,
                hide_server_paths(entry.failure) if entry.failure is not None and self._backing_off(entry) else None,
                (download.done_bytes, download.total_bytes) if download is not None else None,
            ))  # fmt: skip
        return statuses

    def status(self, name: str) -> ModelStatus:
        return next(status for status in self.describe() if status.name == name)

    def loaded(self) -> dict[str, ChatService | EmbeddingService]:
        """The loaded models' services, by name."""
        return {
            name: entry.served.service
            for name, entry in self._entries.items()
            if entry.state == "loaded" and entry.served is not None
        }

    @property
    def used_bytes(self) -> int:
        return sum(entry.served.memory_bytes for entry in self._entries.values() if entry.served is not None)

    # -- lifecycle --------------------------------------------------------------------------------------

    def preload(self, names: list[str]) -> None:
        """Load these models before serving (blocking, at start-up; ModelUnavailableError if one cannot load)."""
        for name in names:
            entry = self._entries[name]
            served = self._loader.load(entry.spec)
            self._loaded(entry, served)

    async def load(self, name: str) -> ModelStatus:
        """Load the model now; a model that failed before is tried again at once (its back-off is lifted)."""
        entry = self._entries[name]
        entry.retry_at = 0.0
        await self._load(entry)
        return self.status(name)

    async def unload(self, name: str) -> ModelStatus:
        """Unload the model now (ConflictError for a pinned one: its configuration says it stays)."""
        if self._fixed is not None:
            raise InvalidRequestError(f"model {name!r} cannot be unloaded: {self._fixed}", "model")
        entry = self._entries[name]
        if entry.spec.pinned:
            raise ConflictError(
                f"model {name!r} is pinned (pinned = true in --models-config): it stays loaded and is never "
                "unloaded by request",
                "model",
                "model_pinned",
            )
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
        async with self._changing:
            await self._unload(entry, "asked to")
        return self.status(name)

    def start_watching(self) -> None:
        """Unload models idle past their time-to-live, from now on (call on the serving event loop)."""
        timed = any(entry.time_to_live > 0 or entry.ttl is not None for entry in self._entries.values()
                    if not entry.spec.pinned)  # fmt: skip
        if self._watcher is None and timed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def keep_alive(self, name: str, seconds: float) -> None:
        """A client's keep-alive for the model: idle this long, it unloads (0: once its requests are done;
        ``math.inf``: never). A pinned model stays whatever is asked."""
        entry = self._entries[name]
        if entry.spec.pinned or self._fixed is not None:
            return
        entry.ttl = seconds
        self.start_watching()

    async def close(self) -> None:
        """Unload everything (at shutdown): each model drains, and its prompt cache's checkpoints are saved."""
        if self._watcher is not None:
            self._watcher.cancel()
        async with self._changing:
            for entry in self._entries.values():
                await self._unload(entry, "the server is stopping")

    def close_blocking(self) -> None:
        """``close`` for a process whose event loop has ended."""
        for entry in self._entries.values():
            if entry.served is not None:
                entry.served.close(DRAIN_SECONDS)
                entry.served, entry.state = None, "unloaded"

    # -- inside -----------------------------------------------------------------------------------------

    def _use(self, entry: _Entry) -> None:
        entry.last_used = self._clock()
        entry.uses += 1

    async def _load(self, entry: _Entry) -> Served:
        if entry.loading is None:
            entry.loading = asyncio.get_running_loop().create_task(self._load_now(entry))
        try:
            return await asyncio.shield(entry.loading)
        finally:
            if entry.loading is not None and entry.loading.done():
                entry.loading = None

    async def _load_now(self, entry: _Entry) -> Served:
        async with self._changing:
            if entry.served is not None and entry.state == "loaded":
                return entry.served
            self._refuse_while_backing_off(entry)
            try:
                needed = await asyncio.to_thread(self._loader.estimate, entry.spec)
            except ModelUnavailableError as error:
                raise self._failed(entry, error) from None
            await self._make_room(needed, entry)
            entry.state = "loading"
            started = time.perf_counter()
            try:
                served = await asyncio.to_thread(self._loader.load, entry.spec)
            except ModelUnavailableError as error:
                entry.state = "unloaded"
                raise self._failed(entry, error) from None
            except BaseException:
                entry.state = "unloaded"
                raise
            if self.used_bytes + served.memory_bytes > self.budget_bytes:  # the estimate was short
                try:
                    await self._make_room(served.memory_bytes, entry)
                except ModelUnavailableError:
                    await asyncio.to_thread(served.close, 0.0)
                    entry.state = "unloaded"
                    raise
            self._loaded(entry, served)
            entry.resident_until = self._clock() + self.min_residency
            entry.failure, entry.retry_seconds = None, 0.0
            logger.info(
                "Model %s loaded on demand in %.1fs (%s; %s of the %s budget in use)",
                entry.spec.name,
                time.perf_counter() - started,
                describe_bytes(served.memory_bytes),
                describe_bytes(self.used_bytes),
                describe_bytes(self.budget_bytes),
            )
            return served

    def _loaded(self, entry: _Entry, served: Served) -> None:
        entry.served, entry.state = served, "loaded"
        entry.last_used = self._clock()
        for callback in self._on_load:
            callback(entry.spec.name, served.service)

    async def _make_room(self, needed: int, loading: _Entry) -> None:
        """Unload idle models until ``needed`` bytes fit the budget (caller holds ``_changing``).

        Models still in their residency are not unloaded; when only they stand in the way, this waits until
        the first of them may go, and looks again.
        """
        while True:
            free = self.budget_bytes - self.used_bytes
            if needed <= free:
                return
            idle = [
                entry
                for entry in self._entries.values()
                if entry is not loading and entry.served is not None and not entry.spec.pinned
                and not entry.served.busy()
            ]  # fmt: skip
            now = self._clock()
            settled = [entry for entry in idle if entry.resident_until <= now]
            chosen = victims([_candidate(entry) for entry in settled], needed - free)
            if chosen is not None:
                for name in chosen:
                    await self._unload(self._entries[name], f"to make room for {loading.spec.name}")
                return
            if victims([_candidate(entry) for entry in idle], needed - free) is None:
                raise ModelUnavailableError(self._does_not_fit(loading.spec.name, needed), "model_does_not_fit")
            wait = min(entry.resident_until for entry in idle if entry.resident_until > now) - now
            debug(1, "Waiting for room: a model loaded on demand stays its residency (--min-residency)",
                  {"model": loading.spec.name, "seconds": round(wait, 1)})  # fmt: skip
            await asyncio.sleep(min(wait, WATCH_SECONDS))  # looks again: a busy model may have become idle

    def _backing_off(self, entry: _Entry) -> bool:
        return entry.failure is not None and self._clock() < entry.retry_at

    def _refuse_while_backing_off(self, entry: _Entry) -> None:
        """A model whose last load failed is refused at once until its back-off passes."""
        if self._backing_off(entry):
            left = entry.retry_at - self._clock()
            reason = hide_server_paths(entry.failure or "")
            raise ModelUnavailableError(
                f"{reason} (the load failed; it is tried again in {left:.0f}s, or at once by POST /models/load)",
                "model_load_failed",
            )

    def _failed(self, entry: _Entry, error: ModelUnavailableError) -> ModelUnavailableError:
        """Remember a failed load (the back-off doubles each time), log it whole; the client's copy names no path."""
        entry.failure = error.message
        entry.retry_seconds = min(MAX_RETRY_SECONDS, entry.retry_seconds * 2 or RETRY_SECONDS)
        entry.retry_at = self._clock() + entry.retry_seconds
        logger.error("%s; requests for %s are refused for %.0fs", error.message, entry.spec.name, entry.retry_seconds)
        return ModelUnavailableError(hide_server_paths(error.message), error.code or "model_unavailable")

    def _does_not_fit(self, name: str, needed: int) -> str:
        loaded = [
            f"{entry.spec.name} ({describe_bytes(entry.served.memory_bytes)}"
            + (", pinned" if entry.spec.pinned else ", in use" if entry.served.busy() else "")
            + ")"
            for entry in self._entries.values()
            if entry.served is not None
        ]
        return (
            f"model {name!r} needs about {describe_bytes(needed)} and does not fit the "
            f"{describe_bytes(self.budget_bytes)} memory budget beside what is loaded: "
            f"{', '.join(loaded) or 'nothing'}; raise --memory-budget, or unload a model (POST /models/unload)"
        )

    async def _unload(self, entry: _Entry, why: str) -> None:
        served = entry.served
        if served is None:
            return
        entry.state = "unloading"
        started = time.perf_counter()
        await asyncio.to_thread(served.close, DRAIN_SECONDS)
        entry.served, entry.state = None, "unloaded"
        logger.info("Model %s unloaded (%s) in %.1fs", entry.spec.name, why, time.perf_counter() - started)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            now = self._clock()
            for entry in list(self._entries.values()):
                spec, served = entry.spec, entry.served
                ttl = entry.time_to_live
                kept = entry.ttl is not None  # a client's keep-alive: 0 means as soon as it is idle
                expired = (ttl > 0 or kept) and not spec.pinned and now - entry.last_used >= ttl
                if served is not None and entry.state == "loaded" and expired and not served.busy():
                    async with self._changing:
                        if entry.served is served and not served.busy():
                            await self._unload(entry, f"idle for {ttl:g}s")


def _candidate(entry: _Entry) -> tuple[str, int, int, float]:
    """What ``memory.victims`` weighs of a loaded model: its name, size, uses and last use."""
    assert entry.served is not None
    return entry.spec.name, entry.served.memory_bytes, entry.uses, entry.last_used


class _Prebuilt:
    """A loader of models that are already built (``pool_of``): each loads as itself, once."""

    def __init__(self, served: Mapping[str, Served]) -> None:
        self._served = dict(served)

    def estimate(self, spec: ModelSpec) -> int:
        return self._served[spec.name].memory_bytes

    def load(self, spec: ModelSpec) -> Served:
        return self._served[spec.name]


def pool_of(
    served: Mapping[str, Served], aliases: tuple[tuple[str, str], ...] = (), fixed: str | None = None
) -> ModelPool:
    """A pool of models built elsewhere (a distributed model's rank 0, in-process tests, benchmarks), all loaded
    and pinned (first of a kind: the default); ``fixed`` says why none may be unloaded (None: they may be)."""
    specs = tuple(
        ModelSpec(name, None, "chat" if isinstance(model.service, ChatService) else "embedding")
        for name, model in served.items()
    )
    pool = ModelPool(Registry(specs, aliases), _Prebuilt(served), budget_bytes=2**62, fixed=fixed)
    pool.preload(list(served))
    return pool
