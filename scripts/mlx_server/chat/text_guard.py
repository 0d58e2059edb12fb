"""Text a client sends stays text: a special token's spelling in a message never becomes that token.

A chat template renders messages as one string, and tokenizing it whole
turns every ``<|im_start|>``, ``<start_of_turn>``, ``<|channel|>`` or
``<image_soft_token>`` in it into the control token it spells, wherever it
came from: a line of a file a tool read, a paragraph about chat templates, a
user's paste.  The model would then read a turn that nobody sent, and a vision
model would look for an image where there is none.  So the text of messages
and tools has each special token's spelling replaced by a sentinel before the
template renders it (``protect``), and the rendered text is tokenized piece
by piece (``tokens``): the template's own markup as tokens, each sentinel as
the plain text it stands for (the tokenizer's ``split_special_tokens``).

Sentinels are Unicode noncharacters (U+FDD0..U+FDEF, reserved for a
program's internal use), which the dialects replace in anything a client
sends (``plain``), so they can only be ours.  ``IMAGE_SLOT`` is the one a
vision model's image takes in the text until the chat core splices in its
tokens.  Which tokens count as special is the tokenizer's own word (its
added tokens marked special); the others (Qwen3's ``<tool_call>``, ``<think>``)
are ordinary vocabulary and stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from mlx_server.mlx_lm_compat import hf_tokenizer
from mlx_server.vocabulary import Message, Tool

__all__ = ["IMAGE_SLOT", "NONCHARACTERS", "TextGuard", "plain"]

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
IMAGE_SLOT = "\ufdd2"
_DIGITS = "".join(chr(0xFDE0 + digit) for digit in range(16))
NONCHARACTERS = re.compile("[\ufdd0-\ufdef]")
_SENTINEL = re.compile(f"{_OPEN}([{_DIGITS}]+){_CLOSE}")


def plain(text: str) -> str:
    """``text`` without Unicode noncharacters (each becomes U+FFFD): what may reach the chat core from outside."""
    return NONCHARACTERS.sub("\ufffd", text) if max(text, default="\x00") >= "\ufdd0" else text


class TextGuard:
    """One tokenizer's special tokens, kept out of client text (see the module's docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        specials = sorted(_special_tokens(tokenizer), key=len, reverse=True)
        self.specials: tuple[str, ...] = tuple(specials)
        self._index = {special: index for index, special in enumerate(self.specials)}
        self._pattern = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self._first_characters = frozenset(special[0] for special in self.specials)

    def protect(self, text: str) -> str:
        """``text`` with each special token's spelling replaced by its sentinel (the same text when none occurs)."""
        if self._pattern is None or not self._first_characters.intersection(text):
            return text
        return self._pattern.sub(lambda match: self._sentinel(self._index[match.group(0)]), text)

    def protect_messages(self, messages: Sequence[Message]) -> list[Message]:
        """The messages with their text, reasoning and call arguments protected."""
        protected = []
        for message in messages:
            calls = tuple(replace(call, arguments=self.protect(call.arguments)) for call in message.tool_calls)
            protected.append(
                replace(
                    message,
                    content=self.protect(message.content),
                    reasoning=self.protect(message.reasoning) if message.reasoning else message.reasoning,
                    tool_calls=calls,
                )
            )
        return protected

    def protect_tools(self, tools: Sequence[Tool]) -> list[Tool]:
        """Tools with their descriptions and schemas protected (a client wrote them too)."""
        return [
            replace(
                tool,
                description=self.protect(tool.description) if tool.description else tool.description,
                parameters=_mapped(tool.parameters, self.protect) if tool.parameters is not None else None,
            )
            for tool in tools
        ]

    def tokens(self, rendered: str) -> list[int]:
        """The rendered prompt's tokens: its markup as the template wrote it, each sentinel as plain text."""
        if _OPEN not in rendered:
            return self._encode(rendered)
        tokens: list[int] = []
        position = 0
        for match in _SENTINEL.finditer(rendered):
            tokens += self._encode(rendered[position : match.start()])
            special = self.specials[int("".join(f"{_DIGITS.index(digit):x}" for digit in match.group(1)), 16)]
            tokens += self._encode(special, split_special_tokens=True)
            position = match.end()
        return tokens + self._encode(rendered[position:])

    def _sentinel(self, index: int) -> str:
        return _OPEN + "".join(_DIGITS[int(digit, 16)] for digit in f"{index:x}") + _CLOSE

    def _encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        if split_special_tokens:
            encoded = hf_tokenizer(self._tokenizer).encode(text, add_special_tokens=False, split_special_tokens=True)
        else:
            encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return [int(token) for token in encoded]


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's added tokens that are marked special (control tokens: turns, channels, images)."""
    try:
        added = hf_tokenizer(tokenizer).added_tokens_decoder
    except (AttributeError, TypeError):
        return []
    return [token.content for token in added.values() if getattr(token, "special", False) and token.content]


def _mapped(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` (JSON-like) with ``change`` applied to every string in it, keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {change(key) if isinstance(key, str) else key: _mapped(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_mapped(item, change) for item in value]
    return value
