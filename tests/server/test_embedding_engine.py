"""The embedding engine's worker: what a client that went away costs it (nothing more than what already ran).

The model here is a stand-in module whose forward pass waits on the test, so
which batches run is seen exactly; real models are the family tests' job.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import mlx.core as mx

from mlx_server.engine.embedding import MAX_BATCH_ROWS, EmbeddingEngine
from mlx_server.model.embedding_models import LoadedEmbedder, Pooling

DIMENSIONS = 4


class GatedModel:
    """A decoder's hidden states (ones) after each forward pass is let through; counts the passes begun and done."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.begun = 0
        self.passes = 0
        self.model = self

    def __call__(self, padded: mx.array) -> mx.array:
        self.begun += 1
        self.gate.acquire()
        self.passes += 1
        return mx.ones((padded.shape[0], padded.shape[1], DIMENSIONS))


def engine_over(model: GatedModel) -> EmbeddingEngine:
    loaded = LoadedEmbedder(model, None, "gated", "test", "test", "decoder", 64, DIMENSIONS, Pooling("mean"))
    return EmbeddingEngine(loaded)


async def cancelled_after(task: asyncio.Task[Any], model: GatedModel, passes: int) -> None:
    while model.passes < passes:
        await asyncio.sleep(0.01)
    task.cancel()


def test_a_request_whose_client_left_before_its_turn_is_never_run() -> None:
    model = GatedModel()
    engine = engine_over(model)

    async def scenario() -> None:
        first = asyncio.ensure_future(engine.embed([[1, 2]]))
        await asyncio.sleep(0.05)  # the first is running (its pass waits at the gate)
        second = asyncio.ensure_future(engine.embed([[3, 4]]))
        await asyncio.sleep(0.05)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)  # its client has left
        model.gate.release()
        assert (await first).shape == (1, DIMENSIONS)
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert model.begun == 1, "the abandoned request's pass never began"
    engine.shutdown()


def test_a_run_stops_between_batches_once_its_client_has_gone() -> None:
    model = GatedModel()
    engine = engine_over(model)

    async def scenario() -> None:
        task = asyncio.ensure_future(engine.embed([[1, 2]] * (3 * MAX_BATCH_ROWS)))
        model.gate.release()
        await cancelled_after(task, model, 1)
        await asyncio.wait([task])  # the cancellation has reached the engine before the gate opens again
        for _ in range(3):
            model.gate.release()
        await asyncio.sleep(0.2)

    asyncio.run(scenario())
    assert model.passes < 3, "the batches after the client left were skipped"
    engine.shutdown()
