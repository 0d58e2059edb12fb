"""Start-up: choose the BLAS, load the model, then export it or serve it.

The order matters: the BLAS must be loaded before anything imports MLX, and
the model is loaded before the port opens, so no request meets a half-ready
server.
"""

from __future__ import annotations

import logging
import time

from mlx_server.blas import preload_optimized_blas
from mlx_server.settings import Settings
from utils_logging import debug, setup_logger

__all__ = ["EXIT_MODEL_ERROR", "run"]

EXIT_MODEL_ERROR = 2


def run(settings: Settings, logger: logging.Logger) -> int:
    """Serve (or export) until stopped; returns the process exit code."""
    blas = preload_optimized_blas(settings.blas)
    if blas.warning:
        logger.warning("BLAS: %s", blas.warning)

    from mlx_server.model_loading import ModelLoadError, export_mlx_model, load_model

    started = time.perf_counter()
    try:
        loaded = load_model(settings.model, keep_quantized=settings.keep_quantized)
    except ModelLoadError as error:
        logger.error("Cannot load the model: %s", error)
        return EXIT_MODEL_ERROR
    for warning in loaded.warnings:
        logger.warning("%s", warning)
    logger.info(
        "Model %s loaded in %.1fs (%s, %s weights, context %d tokens) on %s, BLAS %s",
        loaded.name,
        time.perf_counter() - started,
        loaded.kind,
        "quantized" if loaded.quantized else "float32" if loaded.kind == "gguf" else "native",
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

    from mlx_server.app import ServerState, create_app
    from mlx_server.generation import GenerationEngine

    engine = GenerationEngine(loaded)
    logger.info("Warm-up generation took %.0fms", engine.warm_up())
    app = create_app(ServerState(settings=settings, blas=blas, engine=engine))
    app.state.model_name = loaded.name
    for name in ("uvicorn", "uvicorn.access"):  # uvicorn.error propagates into uvicorn
        setup_logger(name, log_file=settings.log_file)
    logger.info("Serving OpenAI-compatible API at http://%s:%d/v1", settings.host, settings.port)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=10)
    finally:
        engine.shutdown()
    return 0
