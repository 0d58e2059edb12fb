"""What parsing a reply yields: its content and calls as pieces, and the rules that make a parsed call a call.

A call gets a fresh id, arguments as a JSON object (a custom tool's call, its
text), and a name among the offered tools, or it is refused (``finish_calls``).
``tool_parsing`` produces the pieces as text streams; ``run`` sends them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Union

from mlx_server.vocabulary import CUSTOM_TOOL, FUNCTION_TOOL, ToolCall

__all__ = [
    "CallAbandonedPiece",
    "CallArgumentsPiece",
    "CallPiece",
    "CallStartPiece",
    "ContentPiece",
    "Piece",
    "ToolKinds",
    "arguments_object",
    "as_call",
    "finish_calls",
    "new_tool_call_id",
    "tool_kinds",
]

ToolKinds = Mapping[str, str]
"""The offered tools: name -> ``function`` or ``custom``."""


def new_tool_call_id() -> str:
    """A fresh id for every call: clients match tool results to calls by it."""
    return f"call_{secrets.token_hex(12)}"


def tool_kinds(tools: ToolKinds | Collection[str]) -> dict[str, str]:
    """A name -> kind map; a plain collection of names means functions."""
    if isinstance(tools, Mapping):
        return dict(tools)
    return dict.fromkeys(tools, FUNCTION_TOOL)


def as_call(value: Any) -> dict[str, Any]:
    """``{"name", "arguments"|"parameters"}`` with arguments as an object (a JSON string is decoded).

    A custom tool's call carries its text as ``input`` instead.
    """
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError("a tool call needs a string 'name'")
    if isinstance(value.get("input"), str) and "arguments" not in value:
        return {"name": value["name"], "input": value["input"]}
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return {"name": value["name"], "arguments": arguments}


def finish_calls(raw_calls: list[dict[str, Any]], tools: ToolKinds) -> list[ToolCall]:
    """Give each call its id, and JSON arguments (or a custom tool's text); unknown tools are refused."""
    calls = []
    for raw in raw_calls:
        call = as_call(raw)
        kind = tools.get(call["name"])
        if kind is None:
            raise ValueError(f"the model called {call['name']!r}, which is not among the offered tools")
        if kind == CUSTOM_TOOL:
            text = call.get("input")
            if text is None:
                arguments = call["arguments"]
                text = arguments.get("input") if isinstance(arguments, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"the custom tool {call['name']!r} was called without text input")
            calls.append(ToolCall(new_tool_call_id(), call["name"], text, CUSTOM_TOOL))
        elif "arguments" not in call:
            raise ValueError(f"the function {call['name']!r} was called without JSON arguments")
        else:
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            calls.append(ToolCall(new_tool_call_id(), call["name"], arguments))
    return calls


def arguments_object(arguments: str) -> dict[str, Any] | None:
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class ContentPiece:
    text: str


@dataclass
class CallPiece:
    """A whole call; ``index`` is its place among the reply's calls, ``streamed`` whether it was streamed."""

    call: ToolCall
    index: int = 0
    streamed: bool = False


@dataclass
class CallStartPiece:
    """A call is being written: its id and name (its arguments follow)."""

    index: int
    id: str
    name: str


@dataclass
class CallArgumentsPiece:
    """More of a streamed call's arguments (the pieces of one call add up to its final arguments)."""

    index: int
    text: str


@dataclass
class CallAbandonedPiece:
    """A streamed call that did not end as a call (cut short by the token limit): it is not among the calls."""

    index: int


Piece = Union[ContentPiece, CallPiece, CallStartPiece, CallArgumentsPiece, CallAbandonedPiece]
