"""Start-up: choose the BLAS, load the model, then export it or serve it.

The order matters: the BLAS must be loaded before anything imports MLX, and
the model is loaded before the port opens, so no request meets a half-ready
server.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from mlx_server.blas import preload_optimized_blas
from mlx_server.settings import Settings
from utils_logging import debug, setup_logger

__all__ = ["EXIT_MODEL_ERROR", "run"]

EXIT_MODEL_ERROR = 2
GRACEFUL_SHUTDOWN_SECONDS = 10


def run(settings: Settings, logger: logging.Logger) -> int:
    """Serve (or export) until stopped; returns the process exit code."""
    blas = preload_optimized_blas(settings.blas)
    if blas.warning:
        logger.warning("BLAS: %s", blas.warning)

    from mlx_server.model.loading import ModelLoadError, export_mlx_model, load_model

    started = time.perf_counter()
    try:
        loaded = load_model(settings.model, dequantize=settings.dequantize)
    except ModelLoadError as error:
        logger.error("Cannot load the model: %s", error)
        return EXIT_MODEL_ERROR
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

    if settings.export_mlx is not None:
        destination = export_mlx_model(loaded, settings.export_mlx)
        logger.info("Wrote MLX model directory %s (load it with mlx_lm.load or mlx_lm.server --model)", destination)
        return 0

    import uvicorn

    from mlx_server.agent_environment import ClaudeCodeEnvironment
    from mlx_server.chat.answer_cache import AnswerCache
    from mlx_server.edge.app import ServerState, create_app
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
    logger.info("%s, before this model's %d-token context is full", ClaudeCodeEnvironment(
        engine.context_length).line(), engine.context_length)  # fmt: skip
    logger.info("Warm-up generation took %.0fms", engine.warm_up())
    if settings.warm_prompt is not None:
        warm_prompt_cache(engine, settings.warm_prompt, logger)
    answers = AnswerCache(loaded.identity, settings.response_cache_size)
    app = create_app(ServerState(settings=settings, blas=blas, engine=engine, answers=answers))
    app.state.model_name = loaded.name
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
        engine.shutdown()
        if settings.prompt_cache_dir is not None:
            saved = prompt_cache.save_checkpoints()
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


def warm_prompt_cache(engine: Any, path: Path, logger: logging.Logger) -> None:
    """Prefill the --warm-prompt system prompt so the first real request starts warm."""
    from mlx_server.chat.prompts import render_prompt_with_prefix
    from mlx_server.vocabulary import Message

    try:
        text = path.read_text()
    except OSError as error:
        logger.warning("Warm prompt %s not read: %s", path, error)
        return
    system = text
    if path.suffix == ".json":
        try:
            document = json.loads(text)
            system = str(document["system"])
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("Warm prompt %s: expected JSON with a 'system' string (%s)", path, error)
            return
    messages = [Message("system", system), Message("user", "")]
    prompt, prefix = render_prompt_with_prefix(engine.tokenizer, messages)
    if prefix == 0:
        logger.warning("Warm prompt %s: the chat template does not render the system prompt on its own", path)
        return
    started = time.perf_counter()
    engine.prefill_checkpoint(prompt[:prefix])
    logger.info("Warm prompt: %d tokens prefilled in %.0fms", prefix, (time.perf_counter() - started) * 1000)
