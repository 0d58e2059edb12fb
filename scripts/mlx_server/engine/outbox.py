"""Events from the worker thread to a request's event loop, handed over once per step for the whole batch."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from mlx_server.engine.sequence import Delivery

__all__ = ["Outbox"]


class Outbox:
    """Events for one event loop, handed over once per step: one wake-up for the whole batch, not one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[tuple[asyncio.Queue[Delivery], Delivery]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue[Delivery], event: Delivery) -> None:
        with self._lock:
            self._pending.append((queue, event))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                self._loop.call_soon_threadsafe(_put_all, pending)


def _put_all(pending: list[tuple[asyncio.Queue[Delivery], Delivery]]) -> None:
    for queue, event in pending:
        queue.put_nowait(event)
