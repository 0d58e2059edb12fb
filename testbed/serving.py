"""A tiny model behind the real application, in-process: the real loader, engine, chat core and routes over ASGI.

Used by the family tests and by ``bench/bench_families.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_server.blas import BlasInfo, preload_optimized_blas

preload_optimized_blas()  # before MLX is imported, as the server does

from starlette.testclient import TestClient  # noqa: E402

from mlx_server.edge.app import ServerState, create_app  # noqa: E402
from mlx_server.engine.generation import GenerationEngine  # noqa: E402
from mlx_server.model.loading import LoadedModel  # noqa: E402
from mlx_server.pool.assembly import assemble_chat  # noqa: E402
from mlx_server.pool.pool import pool_of  # noqa: E402
from mlx_server.pool.registry import ModelSpec  # noqa: E402
from mlx_server.settings import Settings  # noqa: E402
from mlx_server.vocabulary import SpeculativeMode  # noqa: E402

__all__ = ["KV_BUDGET", "Served", "serve"]

KV_BUDGET = 2**30


@dataclass
class Served:
    """One family's model behind the real application, with and without the prompt cache."""

    family: str
    loaded: LoadedModel
    engine: GenerationEngine
    client: TestClient
    uncached: TestClient  # no prompt cache
    plain: TestClient  # no speculative decoding


def serve(
    loaded: LoadedModel, prompt_cache_size: int, speculative: SpeculativeMode = "prompt-lookup"
) -> tuple[GenerationEngine, TestClient]:
    """The application over ``loaded``, greedy by default; ``prompt_cache_size`` 0 turns the prompt cache off."""
    settings = Settings(default_temperature=0.0, response_cache_size=0, prompt_cache_size=prompt_cache_size,
                        max_batch=8, prefill_batch=8, speculative=speculative)  # fmt: skip
    model = assemble_chat(loaded, ModelSpec(loaded.name, None), settings, KV_BUDGET)
    state = ServerState(settings, BlasInfo("test", None, optimized=False), pool_of({loaded.name: model}))
    return model.engine, TestClient(create_app(state), base_url="http://localhost")
