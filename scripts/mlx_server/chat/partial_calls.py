"""What is already certain of a tool call that is still being written: its name, and a prefix of its arguments.

A call's arguments reach the client as ``json.dumps(arguments,
ensure_ascii=False)`` once the call is whole.  While it is written, each
format's text is read as far as it goes, and what cannot change any more is
written the same way: complete keys and values as ``json.dumps`` writes them,
a string in progress without its closing quote (``json.dumps`` escapes one
character at a time, so what it wrote stays a prefix), a number, a literal or
a key in progress not at all.  So every prefix given out is a prefix of the
final arguments, and the deltas of a streamed call add up to them exactly.

A format's own parser (mlx-lm's, for most) decides the final call; the
readers here mirror what those parsers do to values (Qwen3-Coder strips one
newline at each end of a parameter, GLM strips whitespace, both type values
by the tool's schema), and hold back whatever that could still change: a
trailing newline, a value that may yet read ``null``, part of a closing tag.
``partial_calls`` returns nothing for formats it does not read (their calls
arrive whole).  Partial JSON libraries complete a truncated value; what is
needed here is the opposite, what no completion can change, so the JSON is
read by ``partial_json``.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_server.chat.partial_json import JsonNode, JsonReader
from mlx_server.mlx_lm_compat import glm_value, python_literal, qwen3_coder_value

__all__ = ["PartialCall", "partial_calls"]


@dataclass(frozen=True)
class PartialCall:
    """A call being written: its name once written whole, and a prefix of its final arguments' JSON."""

    name: str | None
    arguments: str


# -- JSON calls ------------------------------------------------------------------------------------------


def _call_of(members: list[tuple[str, JsonNode]], names: tuple[str, ...] = ("arguments", "parameters")) -> PartialCall:
    """A call object's name (once whole) and arguments (an object; a JSON string of them is read whole only)."""
    found = dict(members)
    name_node = found.get("name")
    name = str(name_node.value) if name_node is not None and name_node.complete else None
    arguments = next((found[key] for key in names if key in found), None)
    if arguments is None or not arguments.text.startswith("{"):
        return PartialCall(name, "")
    return PartialCall(name, arguments.text)


def _json_calls(text: str) -> list[PartialCall]:
    """Call objects one after another, or in lists: Hermes, Llama 3's JSON, Mistral's list."""
    reader = JsonReader(text)
    calls: list[PartialCall] = []
    while True:
        reader.skip(" \t\r\n,;[]")
        if reader.at_end() or reader.text[reader.position] != "{":
            return calls
        calls.append(_call_of(reader.members()))
        reader.skip()
        if reader.at_end() or reader.text[reader.position] != "}":
            return calls
        reader.position += 1


# -- the formats ---------------------------------------------------------------------------------------------

_HARMONY = re.compile(r"^\s*commentary to=functions\.([\w.-]+)(?=[\s<])")
_MISTRAL_HEADER = re.compile(r"([\w-]+)\s*\[ARGS\]\s*")
_FUNCTION = re.compile(r"<function=([^\s<>]+)>")
_PARAMETER = re.compile(r"<parameter=([^\s<>]+)>")
_GLM_NAME = re.compile(r"^\s*([^\s<]+)\s*<arg_key>")
_GLM_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>", re.DOTALL)
_PYTHONIC = re.compile(r"\s*\[\s*([\w.]+)\(")


def partial_calls(format_name: str, text: str, schemas: Sequence[dict[str, Any]] = ()) -> list[PartialCall]:
    """The calls in a call's text so far (what follows its start marker), as far as each is certain.

    Never raises: text no reader makes sense of yet gives nothing (the call then arrives whole).
    """
    try:
        return _partial_calls(format_name, text, schemas)
    except (ValueError, SyntaxError, RecursionError, MemoryError, ImportError, KeyError, TypeError, IndexError):
        return []


def _partial_calls(format_name: str, text: str, schemas: Sequence[dict[str, Any]]) -> list[PartialCall]:
    if format_name in ("hermes", "json_tools", "llama3_json"):
        return _json_calls(text)
    if format_name == "mistral" and text.lstrip()[:1] in ("[", "{", ""):
        return _json_calls(text)
    if format_name in ("mistral", "mistral_args"):
        return [PartialCall(match.group(1), JsonReader(text, match.end()).value().text)
                for match in _MISTRAL_HEADER.finditer(text)]  # fmt: skip
    if format_name == "harmony":
        match = _HARMONY.match("commentary to=" + text)
        if match is None:
            return []
        message = text.find("<|message|>")
        arguments = JsonReader(text, message + len("<|message|>")).value().text if message >= 0 else ""
        return [PartialCall(match.group(1), arguments)]
    if format_name == "qwen3_coder":
        return _qwen3_coder(text, schemas)
    if format_name == "glm47":
        return _glm(text, schemas)
    if format_name == "pythonic":
        return _pythonic(text)
    return []


def _properties(name: str, schemas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    for schema in schemas:
        function = schema.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return properties if isinstance(properties, dict) else {}
    return {}


def _arguments(done: list[tuple[str, Any]], pending: tuple[str, str] | None) -> str:
    """``{"a": 1, "b": "tex`` from the finished arguments and a string one in progress (key, certain text)."""
    parts = [f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}" for key, value in done]
    if pending is not None:
        key, value = pending
        parts.append(f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)[:-1]}")
    return "{" + ", ".join(parts)


def _held_tail(value: str, closing: str) -> str:
    """``value`` less a trailing part of ``closing`` that may be its start."""
    for length in range(min(len(closing) - 1, len(value)), 0, -1):
        if closing.startswith(value[-length:]):
            return value[:-length]
    return value


def _qwen3_coder(text: str, schemas: Sequence[dict[str, Any]]) -> list[PartialCall]:
    """``<function=name>`` then ``<parameter=key>value</parameter>``: values typed as mlx-lm's parser types them."""
    function = _FUNCTION.search(text)
    if function is None:
        return []
    name = function.group(1)
    properties = _properties(name, schemas)
    done: list[tuple[str, Any]] = []
    pending: tuple[str, str] | None = None
    position = function.end()
    while (parameter := _PARAMETER.search(text, position)) is not None:
        key = parameter.group(1)
        end = text.find("</parameter>", parameter.end())
        raw = text[parameter.end() : end if end >= 0 else len(text)]
        if end >= 0:
            value = raw.removeprefix("\n").removesuffix("\n")
            done.append((key, qwen3_coder_value(value, key, properties)))
            position = end + len("</parameter>")
            continue
        if _string_typed(properties.get(key)):
            certain = _held_tail(raw, "</parameter>").removeprefix("\n")
            certain = certain[:-1] if certain.endswith("\n") else certain  # it may be the one that is stripped
            if certain and not _may_read_null(certain):
                pending = (key, certain)
        break
    return [PartialCall(name, _arguments(done, pending))]


def _string_typed(schema: Any) -> bool:
    return isinstance(schema, dict) and str(schema.get("type", "")).strip().lower() in {
        "string", "str", "text", "varchar", "char", "enum"}  # fmt: skip


def _may_read_null(value: str) -> bool:
    """Whether a value in progress may still read ``null`` (which the parser makes None, whatever the type)."""
    return "null".startswith(value.lower())


def _glm(text: str, schemas: Sequence[dict[str, Any]]) -> list[PartialCall]:
    """``name`` then ``<arg_key>k</arg_key><arg_value>v</arg_value>``: string arguments as they are, others read."""
    match = _GLM_NAME.match(text)
    if match is None:
        return []
    name = match.group(1)
    properties = _properties(name, schemas)
    done: list[tuple[str, Any]] = []
    pending: tuple[str, str] | None = None
    for argument in _GLM_ARGUMENT.finditer(text, match.start(1)):
        key = argument.group(1).strip()
        end = text.find("</arg_value>", argument.end())
        raw = text[argument.end() : end if end >= 0 else len(text)]
        string = isinstance(properties.get(key), dict) and properties[key].get("type") == "string"
        if end >= 0:
            value = raw.strip()
            done.append((key, value if string else glm_value(value)))
            continue
        if string:
            pending = (key, _held_tail(raw, "</arg_value>").lstrip().rstrip())
        break
    return [PartialCall(name, _arguments(done, pending))]


def _pythonic(text: str) -> list[PartialCall]:
    """``[name(key=value, ...)]``: each keyword argument once it is whole (values read as Python literals), and a
    string argument as it is written."""
    match = _PYTHONIC.match(text)
    if match is None:
        return []
    done: list[tuple[str, Any]] = []
    rest = text[match.end() :]
    depth, quote, start = 0, "", 0
    for index, char in enumerate(rest):
        if quote:
            if char == quote and rest[index - 1] != "\\":
                quote = ""
            continue
        if char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}" and depth:
            depth -= 1
        elif char in ",)" and depth == 0:
            key, equals, value = rest[start:index].partition("=")
            if equals:
                try:
                    done.append((key.strip(), python_literal(value)))
                except (ValueError, SyntaxError):
                    break
            start = index + 1
            if char == ")":
                return [PartialCall(match.group(1), _arguments(done, None))]
    return [PartialCall(match.group(1), _arguments(done, _python_string_so_far(rest[start:])))]


def _python_string_so_far(argument: str) -> tuple[str, str] | None:
    """``key="text`` (a string argument still being written): its key and the text certain so far."""
    key, equals, value = argument.partition("=")
    value = value.lstrip()
    if not equals or not value or value[0] not in "\"'" or value[:3] in ('"""', "'''"):
        return None
    try:
        whole = ast.literal_eval(value.rstrip())  # the string may be written whole already
    except (ValueError, SyntaxError):
        whole = None
    if isinstance(whole, str):
        return (key.strip(), whole) if whole else None
    body = value[1:]
    backslashes = len(body) - len(body.rstrip("\\"))
    body = body[: len(body) - backslashes % 2]  # half an escape is not text yet
    try:
        text = ast.literal_eval(value[0] + body + value[0])
    except (ValueError, SyntaxError):
        return None
    return (key.strip(), text) if isinstance(text, str) and text else None
