"""Serving one model over several processes: rank 0 serves HTTP and leads every step, the others follow.

Started by ``mlx.launch`` (every rank runs ``scripts/mlx-server.py`` with the
same arguments).  Every rank loads its shard of the one chat model and builds
its engine in lockstep (``engine.lockstep``); rank 0 then serves as a single
process would, and the others run its step plans until it stops.  What the
lockstep cannot carry is refused at start-up with a sentence: several models,
embedding models, a quantized KV cache (it decodes one request at a time
outside the batch), and exporting.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from mlx_server.blas import BlasInfo
from mlx_server.engine.generation import GenerationEngine
from mlx_server.engine.lockstep import DistributedRun, Lockstep
from mlx_server.pool.pool import ModelPool, pool_of
from mlx_server.pool.registry import Registry
from mlx_server.settings import Settings

__all__ = ["refusal", "serve_distributed"]

FIXED = "it is one model served over several processes (mlx.launch); stop them all to change it"


def refusal(settings: Settings, registry: Registry) -> str | None:
    """Why these settings cannot be served over several processes, or None."""
    chat = [spec for spec in registry.models if spec.kind == "chat"]
    if len(registry.models) != 1 or len(chat) != 1:
        return "a model served over several processes is the server's only model: give one --model and no " \
               "--embedding-model (run other models in a server of their own)"  # fmt: skip
    if settings.kv_bits or chat[0].kv_bits:
        return "--kv-bits decodes one request at a time outside the batch, which the ranks cannot follow in step"
    if settings.export_mlx is not None:
        return "--export-mlx runs in one process: run it without mlx.launch"
    return None


def serve_distributed(
    settings: Settings,
    registry: Registry,
    blas: BlasInfo,
    run: DistributedRun,
    logger: logging.Logger,
    serve: Callable[[ModelPool, Callable[[], str | None]], int],
) -> int | None:
    """Load this rank's shard and serve (rank 0, through ``serve``) or follow; None when the model cannot load."""
    from mlx_server.mlx_lm_compat import IncompatibleMlxLmError
    from mlx_server.model.loading import ModelLoadError
    from mlx_server.pool.loading import ModelLoader

    spec = dataclasses.replace(registry.models[0], pinned=True, ttl=0.0)
    engines: list[GenerationEngine] = []  # rank 0's, once built: the watchdog fails what it holds

    def on_failure(reason: str) -> None:
        for engine in engines:
            engine.abandon(reason)

    lockstep = Lockstep(run, settings.distributed_timeout, on_failure)
    logger.info("Distributed model: %s, %s; BLAS %s", spec.name, run.describe(), blas.name)
    try:
        model = ModelLoader(settings, Registry((spec,), registry.aliases), lockstep).load_chat(spec)
    except (ModelLoadError, IncompatibleMlxLmError) as error:
        logger.error("Cannot load the model: %s", error)
        return None
    if not run.leader:
        model.engine.wait_until_stopped()
        logger.info("%s stopped", run.describe())
        return 0
    engines.append(model.engine)
    return serve(pool_of({spec.name: model}, registry.aliases, fixed=FIXED), lambda: model.engine.failure)
