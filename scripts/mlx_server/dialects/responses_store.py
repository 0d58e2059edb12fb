"""The Responses API's stored history: responses kept for ``previous_response_id``, bounded by count and bytes.

With ``store`` (the default) a response and the conversation it ends are kept
in memory, so a later request can continue it by id; an unknown or evicted
id is a ``NotFoundError`` in OpenAI's words.  The conversations keep their
text; images and documents are kept once each, by content digest, in a store
of their own with its own bound, so a screenshot sent with every turn costs
its bytes once, and an evicted one comes back as a short note in its place
(the conversation goes on without it).  Safe from any thread (one lock).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from mlx_server.vocabulary import DocumentPart, ImagePart, Message, NotFoundError, Part, TextPart

__all__ = [
    "DEFAULT_ATTACHMENT_BYTES",
    "DEFAULT_STORED_BYTES",
    "DEFAULT_STORED_RESPONSES",
    "ResponseStore",
    "StoredResponse",
]

DEFAULT_STORED_RESPONSES = 256
DEFAULT_STORED_BYTES = 64 * 1024**2  # the conversations' text, in all
DEFAULT_ATTACHMENT_BYTES = 128 * 1024**2  # their images and documents, each kept once
DROPPED_ATTACHMENT = "[an attachment from an earlier turn is no longer held by the server]"


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and the conversation it ends (input and output, instructions excluded)."""

    body: dict[str, Any]
    conversation: tuple[Message, ...]


@dataclass(frozen=True)
class _Held:
    """An image or document in a stored conversation: its digest stands for its bytes."""

    part: ImagePart | DocumentPart  # with ``data`` left out
    digest: bytes


class _Attachments:
    """Attachment bytes by digest, least recently used out first, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def keep(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        if digest in self._data:
            self._data.move_to_end(digest)
        elif len(data) <= self._max_bytes:
            self._data[digest] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped)
        return digest

    def get(self, digest: bytes) -> bytes | None:
        data = self._data.get(digest)
        if data is not None:
            self._data.move_to_end(digest)
        return data


class ResponseStore:
    """The responses kept for ``previous_response_id``."""

    def __init__(
        self,
        max_entries: int = DEFAULT_STORED_RESPONSES,
        max_bytes: int = DEFAULT_STORED_BYTES,
        attachment_bytes: int = DEFAULT_ATTACHMENT_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[dict[str, Any], tuple[Message | tuple[Message, tuple[Any, ...]], ...],
                                              int]] = OrderedDict()  # fmt: skip
        self._bytes = 0
        self._attachments = _Attachments(attachment_bytes)
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse:
        """The stored response; NotFoundError in OpenAI's words when it is unknown (or was evicted)."""
        with self._lock:
            found = self._entries.get(response_id)
            if found is not None:
                self._entries.move_to_end(response_id)
                body, conversation, _ = found
                return StoredResponse(body, tuple(self._restored(message) for message in conversation))
        raise NotFoundError(
            f"Previous response with id '{response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )

    def put(self, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            conversation = tuple(self._kept(message) for message in stored.conversation)
            size = _size(stored.body, stored.conversation)
            previous = self._entries.pop(response_id, None)
            if previous is not None:
                self._bytes -= previous[2]
            self._entries[response_id] = (stored.body, conversation, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or (self._bytes > self.max_bytes and len(self._entries) > 1):
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def _kept(self, message: Message) -> Message | tuple[Message, tuple[Any, ...]]:
        """The message as stored: its attachments' bytes by digest (caller holds the lock)."""
        if not message.parts:
            return message
        parts = tuple(
            _Held(replace(part, data=None), self._attachments.keep(part.data))
            if isinstance(part, (ImagePart, DocumentPart)) and part.data is not None
            else part
            for part in message.parts
        )
        return replace(message, parts=()), parts

    def _restored(self, kept: Message | tuple[Message, tuple[Any, ...]]) -> Message:
        if isinstance(kept, Message):
            return kept
        message, parts = kept
        restored: list[Part] = []
        for part in parts:
            if isinstance(part, _Held):
                data = self._attachments.get(part.digest)
                restored.append(TextPart(DROPPED_ATTACHMENT) if data is None else replace(part.part, data=data))
            else:
                restored.append(part)
        return replace(message, parts=tuple(restored))


def _size(body: dict[str, Any], conversation: tuple[Message, ...]) -> int:
    """About what an entry holds, attachments left out: its messages' text and its reply's."""
    text = sum(len(message.content) + len(message.reasoning or "") for message in conversation)
    parts = sum(len(part.text) for message in conversation for part in message.parts if isinstance(part, TextPart))
    documents = sum(len(part.text or "") for message in conversation for part in message.parts
                    if isinstance(part, DocumentPart))  # fmt: skip
    return text + parts + documents + len(str(body.get("output", "")))
