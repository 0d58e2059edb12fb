"""JSON read from text that may stop anywhere: what of it is already certain, written as ``json.dumps`` writes it.

Partial JSON libraries complete a truncated value; a streamed tool call needs
the opposite, what no completion can change: complete keys and values as
``json.dumps(value, ensure_ascii=False)`` writes them, a string in progress
without its closing quote (cut before half an escape), and a number, a literal
or a key in progress not at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["JsonNode", "JsonReader"]


@dataclass
class JsonNode:
    """A JSON value read from possibly truncated text: its certain canonical prefix, and whether it is whole."""

    text: str
    complete: bool
    value: Any = None  # the value itself, when complete


class JsonReader:
    """Reads JSON values from text that may stop anywhere (the model is still writing it)."""

    def __init__(self, text: str, position: int = 0) -> None:
        self.text = text
        self.position = position
        self.more = False  # the last members or items read were followed by a comma: another one comes

    def skip(self, characters: str = " \t\r\n") -> None:
        while self.position < len(self.text) and self.text[self.position] in characters:
            self.position += 1

    def at_end(self) -> bool:
        return self.position >= len(self.text)

    def value(self) -> JsonNode:
        self.skip()
        if self.at_end():
            return JsonNode("", False)
        first = self.text[self.position]
        if first == "{":
            return self._object()
        if first == "[":
            return self._array()
        if first == '"':
            return self._string()
        return self._scalar()

    def members(self) -> list[tuple[str, JsonNode]]:
        """An object's members read so far (the last may be incomplete); the reader must be at ``{``."""
        self.position += 1
        members: list[tuple[str, JsonNode]] = []
        self.more = False
        while True:
            self.skip()
            if self.at_end() or self.text[self.position] == "}":
                return members
            key = self._string()
            if not key.complete:
                return members
            self.skip()
            if self.at_end() or self.text[self.position] != ":":
                return members
            self.position += 1
            node = self.value()
            members.append((str(key.value), node))
            self.more = False
            if not node.complete:
                return members
            self.skip()
            if self.at_end() or self.text[self.position] != ",":
                return members
            self.position += 1
            self.more = True

    def _object(self) -> JsonNode:
        start = self.position
        members = self.members()
        more = self.more
        self.skip()
        closed = not self.at_end() and self.text[self.position] == "}"
        parts = [f"{json.dumps(key, ensure_ascii=False)}: {node.text}" for key, node in members]
        if closed and all(node.complete for _, node in members):
            self.position += 1
            value = json.loads(self.text[start : self.position])
            return JsonNode(json.dumps(value, ensure_ascii=False), True, value)
        whole = bool(members) and members[-1][1].complete
        return JsonNode("{" + ", ".join(parts) + (", " if whole and more else ""), False)

    def _array(self) -> JsonNode:
        start = self.position
        self.position += 1
        items: list[JsonNode] = []
        more = False
        while True:
            self.skip()
            if self.at_end() or self.text[self.position] == "]":
                break
            node = self.value()
            items.append(node)
            more = False
            if not node.complete:
                return JsonNode("[" + ", ".join(item.text for item in items), False)
            self.skip()
            if self.at_end() or self.text[self.position] != ",":
                break
            self.position += 1
            more = True
        if not self.at_end() and self.text[self.position] == "]":
            self.position += 1
            value = json.loads(self.text[start : self.position])
            return JsonNode(json.dumps(value, ensure_ascii=False), True, value)
        return JsonNode("[" + ", ".join(item.text for item in items) + (", " if more else ""), False)

    def _string(self) -> JsonNode:
        """A string: whole, or what is certain of it (never half an escape, never half a surrogate pair)."""
        start = self.position
        self.position += 1
        while self.position < len(self.text):
            char = self.text[self.position]
            if char == '"':
                self.position += 1
                value = json.loads(self.text[start : self.position])
                return JsonNode(json.dumps(value, ensure_ascii=False), True, value)
            self.position += 2 if char == "\\" else 1
        self.position = len(self.text)
        raw = _whole_escapes(self.text[start + 1 :])
        return JsonNode(json.dumps(json.loads(f'"{raw}"'), ensure_ascii=False)[:-1], False)

    def _scalar(self) -> JsonNode:
        """A number or a literal: whole only once something follows it."""
        match = re.compile(r"[-+0-9.eEa-z]+").match(self.text, self.position)
        if match is None or match.end() == len(self.text):
            self.position = len(self.text)
            return JsonNode("", False)
        self.position = match.end()
        value = json.loads(match.group(0))
        return JsonNode(json.dumps(value, ensure_ascii=False), True, value)


_HALF_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?$")
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}$")


def _whole_escapes(raw: str) -> str:
    """A string's raw text in progress, cut before half an escape or the first half of a surrogate pair."""
    backslashes = len(raw) - len(raw.rstrip("\\"))
    if backslashes % 2:
        raw = raw[:-1]
    elif (half := _HALF_ESCAPE.search(raw)) is not None and half.group(0) != "\\":
        raw = raw[: half.start()]
    if _HIGH_SURROGATE.search(raw) and (len(raw) < 7 or raw[-7] != "\\"):
        raw = raw[:-6]
    return raw
