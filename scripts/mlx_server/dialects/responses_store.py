"""The Responses API's stored history: responses kept for ``previous_response_id``, a bounded LRU.

With ``store`` (the default) a response and the conversation it ends are kept
in memory, so a later request can continue it by id; an unknown or evicted
id is a ``NotFoundError`` in OpenAI's words.  Safe from any thread (one lock).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_server.vocabulary import Message, NotFoundError

__all__ = ["DEFAULT_STORED_RESPONSES", "ResponseStore", "StoredResponse"]

DEFAULT_STORED_RESPONSES = 256


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and the conversation it ends (input and output, instructions excluded)."""

    body: dict[str, Any]
    conversation: tuple[Message, ...]


class ResponseStore:
    """The responses kept for ``previous_response_id``."""

    def __init__(self, max_entries: int = DEFAULT_STORED_RESPONSES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse:
        """The stored response; NotFoundError in OpenAI's words when it is unknown (or was evicted)."""
        with self._lock:
            found = self._entries.get(response_id)
            if found is not None:
                self._entries.move_to_end(response_id)
        if found is None:
            raise NotFoundError(
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return found

    def put(self, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._entries[response_id] = stored
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
