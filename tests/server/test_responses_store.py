"""The Responses API's stored history: bounded by count and bytes, attachments kept once each by content."""

from __future__ import annotations

import pytest

from mlx_server.dialects.responses_store import DROPPED_ATTACHMENT, ResponseStore, StoredResponse
from mlx_server.vocabulary import ImagePart, Message, NotFoundError, TextPart

SCREENSHOT = b"\x89PNG" + bytes(range(256)) * 4096  # about a megabyte


def turn(text: str, image: bytes | None = None) -> Message:
    parts = (TextPart(text), ImagePart(image, "image/png")) if image is not None else ()
    return Message("user", "" if parts else text, parts=parts)


class TestTheStore:
    def test_a_conversation_comes_back_as_it_was_stored(self) -> None:
        store = ResponseStore()
        conversation = (turn("look", SCREENSHOT), Message("assistant", "a chart"))
        store.put("resp_1", StoredResponse({"id": "resp_1"}, conversation))
        assert store.get("resp_1").conversation == conversation

    def test_an_image_sent_with_every_turn_is_held_once(self) -> None:
        store = ResponseStore(attachment_bytes=2 * len(SCREENSHOT))
        history: tuple[Message, ...] = ()
        for index in range(6):
            history = (*history, turn(f"turn {index}", SCREENSHOT))
            store.put(f"resp_{index}", StoredResponse({}, history))
        assert all(part.data == SCREENSHOT for message in store.get("resp_5").conversation
                   for part in message.parts if isinstance(part, ImagePart))  # fmt: skip

    def test_attachments_past_their_bound_come_back_as_a_note_and_the_conversation_goes_on(self) -> None:
        store = ResponseStore(attachment_bytes=len(SCREENSHOT) + 10)
        store.put("resp_1", StoredResponse({}, (turn("first", SCREENSHOT),)))
        store.put("resp_2", StoredResponse({}, (turn("second", SCREENSHOT[::-1]),)))
        (first,) = store.get("resp_1").conversation
        assert TextPart(DROPPED_ATTACHMENT) in first.parts and TextPart("first") in first.parts

    def test_the_conversations_text_is_bounded_in_bytes(self) -> None:
        store = ResponseStore(max_bytes=1000)
        for index in range(5):
            store.put(f"resp_{index}", StoredResponse({}, (Message("user", "x" * 400),)))
        with pytest.raises(NotFoundError):
            store.get("resp_0")
        assert store.get("resp_4").conversation[0].content == "x" * 400
