"""Start-up: choose the BLAS, load the model, then export it or build the server and serve.

The order matters: the BLAS must be loaded before anything imports MLX, and
the model is loaded (and checked against the installed mlx-lm) before the
port opens, so no request meets a half-ready server, and a model or an
mlx-lm the server cannot run is refused with a sentence, never a traceback.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_server.blas import BlasInfo, preload_optimized_blas
from mlx_server.settings import Settings
from utils_logging import debug, setup_logger

if TYPE_CHECKING:
    from mlx_server.chat.service import ChatService
    from mlx_server.engine.generation import GenerationEngine
    from mlx_server.engine.prompt_cache import KVPromptCache
    from mlx_server.model.loading import LoadedModel

__all__ = ["EXIT_MODEL_ERROR", "run"]

EXIT_MODEL_ERROR = 2
GRACEFUL_SHUTDOWN_SECONDS = 10


@dataclass
class Built:
    """What serving needs: the engine and its prompt cache, the chat service, the answers cache."""

    loaded: LoadedModel
    engine: GenerationEngine
    prompt_cache: KVPromptCache
    service: ChatService
    answers: Any


def run(settings: Settings, logger: logging.Logger) -> int:
    """Serve (or export) until stopped; returns the process exit code."""
    blas = preload_optimized_blas(settings.blas)
    if blas.warning:
        logger.warning("BLAS: %s", blas.warning)
    loaded = load(settings, blas, logger)
    if loaded is None:
        return EXIT_MODEL_ERROR
    if settings.export_mlx is not None:
        return export(loaded, settings.export_mlx, logger)
    built = build(settings, loaded, logger)
    if built is None:
        return EXIT_MODEL_ERROR
    return serve(settings, blas, built, logger)


def load(settings: Settings, blas: BlasInfo, logger: logging.Logger) -> LoadedModel | None:
    """The model, checked against the installed mlx-lm; None (after an ERROR line saying why) if it cannot run."""
    from mlx_server.mlx_lm_compat import IncompatibleMlxLmError, check
    from mlx_server.model.loading import ModelLoadError, load_model

    started = time.perf_counter()
    try:
        loaded = load_model(settings.model, dequantize=settings.dequantize)
        check(loaded.model, loaded.tokenizer)
    except (ModelLoadError, IncompatibleMlxLmError) as error:
        logger.error("Cannot load the model: %s", error)
        return None
    for warning in loaded.warnings:
        logger.warning("%s", warning)
    logger.info(
        "Model %s loaded in %.1fs (%s, %s weights: %s, context %d tokens) on %s, BLAS %s",
        loaded.name,
        time.perf_counter() - started,
        loaded.kind,
        "quantized" if loaded.quantized else "float32" if loaded.kind == "gguf" else "native",
        loaded.weight_format,
        loaded.context_length,
        loaded.device,
        blas.name,
    )
    debug(2, "Model config", loaded.config)
    return loaded


def export(loaded: LoadedModel, destination: Path, logger: logging.Logger) -> int:
    from mlx_server.model.loading import export_mlx_model

    written = export_mlx_model(loaded, destination)
    logger.info("Wrote MLX model directory %s (load it with mlx_lm.load or mlx_lm.server --model)", written)
    return 0


def build(settings: Settings, loaded: LoadedModel, logger: logging.Logger) -> Built | None:
    """The engine (warmed up), its prompt cache and the chat service; the start-up lines that describe them."""
    from mlx_server.agent_environment import ClaudeCodeEnvironment
    from mlx_server.chat.answer_cache import AnswerCache
    from mlx_server.chat.profile import ModelProfile
    from mlx_server.chat.service import ChatService
    from mlx_server.edge.app import service_options
    from mlx_server.engine.generation import EngineOptions, GenerationEngine
    from mlx_server.engine.kv_budget import default_budget_bytes
    from mlx_server.engine.prompt_cache import KVPromptCache

    budget = settings.kv_budget or default_budget_bytes()
    prompt_cache = KVPromptCache.for_model(
        loaded.model,
        loaded.identity,
        max_entries=settings.prompt_cache_size,
        max_bytes=min(settings.prompt_cache_bytes or budget, budget),
        directory=settings.prompt_cache_dir,
    )
    options = EngineOptions(settings.max_batch, settings.prefill_batch, budget, settings.kv_bits, settings.speculative)
    engine = GenerationEngine(loaded, prompt_cache, options)
    logger.info(
        "Batching: up to %d sequences, %d prompts prefilled together; KV budget %.1f GiB (%d bytes per token%s, "
        "%d tokens for one sequence); prompt cache %s",
        engine.max_batch,
        min(settings.prefill_batch, engine.max_batch),
        budget / 2**30,
        engine.budget.bytes_per_token,
        f", {settings.kv_bits}-bit" if settings.kv_bits else "",
        engine.budget.max_sequence_tokens,
        (
            f"up to {prompt_cache.max_entries} entries, {prompt_cache.max_bytes / 2**30:.1f} GiB"
            if prompt_cache.enabled
            else "off"
        ),
    )
    answers = AnswerCache(loaded.identity, settings.response_cache_size)
    recommended = loaded.recommended_sampling if settings.generation_config == "auto" else None
    profile = ModelProfile(loaded.tokenizer, engine.context_length, recommended)
    service = ChatService(engine, service_options(settings), answers, profile=profile)
    logger.info("%s", service.sampling_line())
    logger.info("%s, before this model's %d-token context is full", ClaudeCodeEnvironment(
        engine.context_length).line(), engine.context_length)  # fmt: skip
    logger.info("Warm-up generation took %.0fms", engine.warm_up())
    if settings.warm_prompt is not None:
        warm_prompt_cache(service, settings.warm_prompt, logger)
    return Built(loaded, engine, prompt_cache, service, answers)


def serve(settings: Settings, blas: BlasInfo, built: Built, logger: logging.Logger) -> int:
    """Serve HTTP until a stop signal; then stop the engine and save the prompt cache's checkpoints."""
    import uvicorn

    from mlx_server.edge.app import ServerState, create_app

    state = ServerState(settings=settings, blas=blas, engine=built.engine, answers=built.answers)
    state.attach(built.service)
    app = create_app(state)
    for name in ("uvicorn", "uvicorn.access"):  # uvicorn.error propagates into uvicorn
        setup_logger(name, log_file=settings.log_file)
    logger.info(
        "Serving http://%s:%d: Anthropic /v1/messages (ANTHROPIC_BASE_URL=http://%s:%d), OpenAI /v1/responses, "
        "/v1/chat/completions and /v1/completions (base_url http://%s:%d/v1)",
        *(settings.host, settings.port) * 3,
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
        built.engine.shutdown()
        if settings.prompt_cache_dir is not None:
            saved = built.prompt_cache.save_checkpoints()
            logger.info("Prompt cache: saved %d checkpoints to %s", saved, settings.prompt_cache_dir)
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
