"""Start-up: choose the BLAS, read which models to serve, load the default one, then serve (or export it).

The order matters: the BLAS must be loaded before anything imports MLX, and
the default model is loaded (and checked against the installed mlx-lm)
before the port opens, so no request meets a half-ready server, and a model,
a models configuration or an mlx-lm the server cannot run is refused with a
sentence, never a traceback.  Other models load on first use.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_server.blas import BlasInfo, preload_optimized_blas
from mlx_server.settings import Settings
from utils_logging import setup_logger

if TYPE_CHECKING:
    from mlx_server.chat.service import ChatService
    from mlx_server.engine.lockstep import DistributedRun
    from mlx_server.pool.pool import ModelPool
    from mlx_server.pool.registry import Registry

__all__ = ["EXIT_MODEL_ERROR", "run"]

EXIT_MODEL_ERROR = 2
GRACEFUL_SHUTDOWN_SECONDS = 10


def run(settings: Settings, logger: logging.Logger) -> int:
    """Serve (or export) until stopped; returns the process exit code."""
    blas = preload_optimized_blas(settings.blas)
    if blas.warning:
        logger.warning("BLAS: %s", blas.warning)
    from mlx_server.model.hub import set_offline

    set_offline(settings.offline)
    from mlx_server.pool.registry import RegistryError, build_registry

    try:
        registry = build_registry(settings)
    except RegistryError as error:
        logger.error("Cannot serve these models: %s", error)
        return EXIT_MODEL_ERROR
    from mlx_server.distributed.group import launched_group

    distributed = launched_group(settings.parallel)
    if distributed is not None:
        return serve_over_processes(settings, registry, blas, distributed, logger)
    if settings.export_mlx is not None:
        return export(registry, settings, settings.export_mlx, logger)
    pool = build(settings, registry, blas, logger)
    if pool is None:
        return EXIT_MODEL_ERROR
    return serve(settings, blas, pool, logger)


def serve_over_processes(
    settings: Settings, registry: Registry, blas: BlasInfo, run: DistributedRun, logger: logging.Logger
) -> int:
    """Under mlx.launch: this rank's shard; rank 0 serves HTTP, the others follow it (Ctrl-C reaches rank 0)."""
    from mlx_server.distributed.serving import refusal, serve_distributed

    refused = refusal(settings, registry)
    if refused is not None:
        logger.error("Cannot serve over several processes: %s", refused)
        return EXIT_MODEL_ERROR
    if not run.leader:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 stops, and tells the others
    code = serve_distributed(settings, registry, blas, run, logger,
                             lambda pool, failure: serve(settings, blas, pool, logger, failure))  # fmt: skip
    return EXIT_MODEL_ERROR if code is None else code


def export(registry: Registry, settings: Settings, destination: Path, logger: logging.Logger) -> int:
    """Write the default chat model as an MLX model directory, and exit."""
    from mlx_server.model.loading import ModelLoadError, export_mlx_model, load_model

    spec = registry.default("chat")
    assert spec is not None, "a registry always has a chat model"
    try:
        loaded = load_model(spec.source, dequantize=settings.dequantize)
    except ModelLoadError as error:
        logger.error("Cannot load the model: %s", error)
        return EXIT_MODEL_ERROR
    written = export_mlx_model(loaded, destination)
    logger.info("Wrote MLX model directory %s (load it with mlx_lm.load or mlx_lm.server --model)", written)
    return 0


def build(settings: Settings, registry: Registry, blas: BlasInfo, logger: logging.Logger) -> ModelPool | None:
    """The model pool with the default chat model (and every pinned one) loaded and warm; None if one cannot load."""
    from mlx_server.pool.loading import ModelLoader
    from mlx_server.pool.memory import default_memory_budget, describe_bytes
    from mlx_server.pool.pool import ModelPool
    from mlx_server.vocabulary import ModelUnavailableError

    budget = settings.memory_budget or default_memory_budget()
    loader = ModelLoader(settings, registry)
    pool = ModelPool(registry, loader, budget, min_residency=settings.min_residency)
    aliases = {name: [pattern for pattern, target in registry.aliases if target == name] for name in
               (spec.name for spec in registry.models)}  # fmt: skip
    described = []
    for spec in registry.models:
        notes = [spec.kind, *(["default"] if spec is registry.default(spec.kind) else [])]
        notes += ["pinned"] if spec.pinned else [f"unloads after {spec.ttl:g}s idle"] if spec.ttl else []
        notes += [f"for {' '.join(aliases[spec.name])}"] if aliases[spec.name] else []
        described.append(f"{spec.name} ({', '.join(notes)})")
    logger.info("Models: %s; memory budget %s (--memory-budget), BLAS %s", "; ".join(described),
                describe_bytes(budget), blas.name)  # fmt: skip
    default = registry.default("chat")
    assert default is not None
    preloaded = [default.name, *(spec.name for spec in registry.models if spec.pinned and spec is not default)]
    try:
        pool.preload(preloaded)
    except ModelUnavailableError as error:
        logger.error(
            "Cannot load the model: %s", error.message.removeprefix(f"model {default.name!r} cannot be loaded: ")
        )
        return None
    if settings.warm_prompt is not None:
        service = pool.loaded()[default.name]
        from mlx_server.chat.service import ChatService

        assert isinstance(service, ChatService)
        warm_prompt_cache(service, settings.warm_prompt, logger)
    return pool


def serve(
    settings: Settings,
    blas: BlasInfo,
    pool: ModelPool,
    logger: logging.Logger,
    failure: Callable[[], str | None] | None = None,
) -> int:
    """Serve HTTP until a stop signal; then unload every model (their prompt caches' checkpoints are saved).

    ``failure`` says why the served model can no longer run (a distributed rank stopped): /health then answers 503.
    """
    import uvicorn

    from mlx_server.edge.app import ServerState, create_app
    from mlx_server.edge.guards import is_loopback

    state = ServerState(settings=settings, blas=blas, models=pool)
    if failure is not None:
        state.failure = failure
    app = create_app(state)
    for name in ("uvicorn", "uvicorn.access"):  # uvicorn.error propagates into uvicorn
        setup_logger(name, log_file=settings.log_file)
    logger.info(
        "Serving http://%s:%d: Anthropic /v1/messages (ANTHROPIC_BASE_URL=http://%s:%d), OpenAI /v1/responses, "
        "/v1/chat/completions, /v1/completions and /v1/embeddings (base_url http://%s:%d/v1)",
        *(settings.host, settings.port) * 3,
    )
    if not is_loopback(settings.host) and not settings.api_keys:
        logger.warning(
            "Listening on %s without an API key: anyone who can reach this address can use the models and read "
            "/v1/cache; set MLX_SERVER_API_KEY (or bind 127.0.0.1)",
            settings.host,
        )
    _finish_after_uvicorn_stops()
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    finally:
        pool.close_blocking()
    reason = failure() if failure is not None else None
    if reason is not None:
        from mlx_server.engine.lockstep import EXIT_DISTRIBUTED_FAILURE

        logger.error("Server stopped: %s", reason)
        return EXIT_DISTRIBUTED_FAILURE
    logger.info("Server stopped")
    return 0


def _finish_after_uvicorn_stops() -> None:
    """Let a stop signal end the process through ``run``'s clean-up.

    uvicorn handles SIGINT and SIGTERM itself: it stops accepting, lets
    in-flight requests finish (up to GRACEFUL_SHUTDOWN_SECONDS, then cancels
    them, which stops their generation), and then re-raises the signal to the
    handler that was installed before it.  Python's default SIGTERM action
    would kill the process there, before the prompt cache is saved; this
    handler does nothing, so ``run`` finishes and exits 0.
    """
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda _signal, _frame: None)


def warm_prompt_cache(service: ChatService, path: Path, logger: logging.Logger) -> None:
    """Prefill the --warm-prompt system prompt (text, or JSON ``{"system": ...}``): the first request starts warm."""
    try:
        text = path.read_text()
    except OSError as error:
        logger.warning("Warm prompt %s not read: %s", path, error)
        return
    system = text
    if path.suffix == ".json":
        try:
            system = str(json.loads(text)["system"])
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("Warm prompt %s: expected JSON with a 'system' string (%s)", path, error)
            return
    started = time.perf_counter()
    prefilled = service.warm(system)
    if prefilled == 0:
        logger.warning("Warm prompt %s: the chat template does not render the system prompt on its own", path)
        return
    logger.info("Warm prompt: %d tokens prefilled in %.0fms", prefilled, (time.perf_counter() - started) * 1000)
