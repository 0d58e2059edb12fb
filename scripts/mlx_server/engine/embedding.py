"""Embeddings: one worker thread owns an embedding model and runs the inputs of waiting requests together.

Inputs are sorted by length and run in batches (at most ``MAX_BATCH_ROWS``
rows and ``MAX_BATCH_TOKENS`` padded tokens each), so short inputs are not
padded to long ones; every row's padding is masked (a decoder's padding
comes after its tokens, which causal attention never reads; an encoder is
given the attention mask), and each row is pooled over its own tokens, so an
input's vector is the same alone or in a batch.  Requests that wait together
are run together; a request whose client went away (its awaiting task
cancelled) is dropped before its turn, and the batches of a run stop once
every request in it has gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_server.model.embedding_models import LoadedEmbedder, Pooling
from mlx_server.vocabulary import ModelUnloadedError

__all__ = ["MAX_BATCH_ROWS", "MAX_BATCH_TOKENS", "EmbeddingEngine", "pool_states"]

logger = logging.getLogger("mlx")

MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 8192


def pool_states(states: mx.array, lengths: list[int], pooling: Pooling) -> mx.array:
    """One vector per row of ``states`` ([rows, tokens, hidden], right-padded to ``lengths``), as ``pooling`` says."""
    if pooling.mode == "last_token":
        pooled = states[mx.arange(len(lengths)), mx.array(lengths) - 1]
    elif pooling.mode == "cls":
        pooled = states[:, 0]
    else:
        mask = (mx.arange(states.shape[1])[None, :] < mx.array(lengths)[:, None]).astype(states.dtype)
        pooled = (states * mask[..., None]).sum(axis=1) / mx.array(lengths, dtype=states.dtype)[:, None]
    pooled = pooled.astype(mx.float32)
    if pooling.normalize:
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


@dataclass
class _Job:
    """One request's inputs, its result, and whether its client is still there."""

    inputs: list[list[int]]
    future: Future[np.ndarray] = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)


class _AbandonedError(Exception):
    """Every request of a run went away: its remaining batches are skipped."""


class EmbeddingEngine:
    """Owns an embedding model (shared state under ``_condition``); ``embed`` from any event loop."""

    def __init__(self, loaded: LoadedEmbedder) -> None:
        self.loaded = loaded
        self._condition = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._running = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="mlx-embeddings", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def dimensions(self) -> int:
        return self.loaded.dimensions

    def busy(self) -> bool:
        with self._condition:
            return bool(self._jobs) or self._running > 0

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Float32 vectors, one row per input, pooled as the model's pooling says (never an empty input).

        Cancelling the awaiting task (a client that went away) drops the work.
        """
        job = self._submit(inputs)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.abandoned.set()
            raise

    def _submit(self, inputs: list[list[int]]) -> _Job:
        job = _Job(inputs)
        with self._condition:
            if self._stopping:
                job.future.set_exception(ModelUnloadedError(self.loaded.name))
                return job
            self._jobs.append(job)
            self._condition.notify_all()
        return job

    def shutdown(self, drain_seconds: float = 0.0) -> None:
        """Finish what runs and, within ``drain_seconds``, what waits; the rest ends with ModelUnloadedError."""
        with self._condition:
            self._condition.wait_for(lambda: not self._jobs and not self._running, timeout=drain_seconds)
            self._stopping = True
            abandoned = list(self._jobs)
            self._jobs.clear()
            self._condition.notify_all()
        for job in abandoned:
            job.future.set_exception(ModelUnloadedError(self.loaded.name))
        self._thread.join(timeout=60)

    def _work(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._jobs) or self._stopping)
                if self._stopping:
                    return
                jobs = [job for job in self._jobs if not job.abandoned.is_set() and not job.future.cancelled()]
                self._jobs.clear()
                self._running = len(jobs)
            if jobs:
                self._answer(jobs)
            with self._condition:
                self._running = 0
                self._condition.notify_all()

    def _answer(self, jobs: list[_Job]) -> None:
        """Run the jobs' inputs together and hand each its rows (or the failure)."""
        try:
            vectors = self.run([row for job in jobs for row in job.inputs],
                               lambda: all(job.abandoned.is_set() for job in jobs))  # fmt: skip
        except _AbandonedError:
            logger.info("Embedding stopped: every client of the batch disconnected")
            for job in jobs:
                job.future.cancel()
        except Exception as error:  # handed to every waiting request, which reports it
            logger.error("Embedding failed: %s: %s", type(error).__name__, error, exc_info=error)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
        else:
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(vectors[start : start + len(job.inputs)])
                start += len(job.inputs)

    def run(self, inputs: list[list[int]], abandoned: Callable[[], bool] = lambda: False) -> np.ndarray:
        """The vectors of ``inputs``, in order (on the calling thread: the worker, or a benchmark's own).

        ``abandoned()`` is asked between batches: True ends the run (``_AbandonedError``).
        """
        out = np.zeros((len(inputs), self.dimensions), dtype=np.float32)
        order = sorted(range(len(inputs)), key=lambda index: len(inputs[index]))
        batch: list[int] = []
        for index in order:
            longest = len(inputs[index])  # sorted: the newest row is the longest
            if batch and (len(batch) >= MAX_BATCH_ROWS or longest * (len(batch) + 1) > MAX_BATCH_TOKENS):
                self._run_batch([inputs[i] for i in batch], batch, out)
                batch = []
                if abandoned():
                    raise _AbandonedError
            batch.append(index)
        if batch:
            self._run_batch([inputs[i] for i in batch], batch, out)
        return out

    def _run_batch(self, rows: list[list[int]], positions: list[int], out: np.ndarray) -> None:
        lengths = [len(row) for row in rows]
        width = max(lengths)
        padded = mx.array([row + [0] * (width - len(row)) for row in rows])
        states = self._states(padded, lengths)
        vectors = pool_states(states, lengths, self.loaded.pooling)
        mx.eval(vectors)
        out[positions] = np.array(vectors)

    def _states(self, padded: mx.array, lengths: list[int]) -> mx.array:
        model = self.loaded.model
        if self.loaded.architecture == "decoder":
            states: mx.array = model.model(padded)  # the transformer's last hidden states (after its final norm)
            return states
        mask = (mx.arange(padded.shape[1])[None, :] < mx.array(lengths)[:, None]).astype(mx.int32)
        output = model(padded, attention_mask=mask)
        hidden: mx.array = output.last_hidden_state
        return hidden
