"""Tool calls out of generated text: which format a model writes, and parsing it, whole or as a stream.

Every model family writes calls its own way: Hermes and Qwen 2.5 wrap a JSON
object in ``<tool_call>…</tool_call>``, Mistral writes ``[TOOL_CALLS]`` and a
JSON list, Llama 3 writes a bare ``{"name": …, "parameters": …}``, and newer
families have formats of their own.  mlx-lm ships a parser for most of them and
infers which one a chat template uses; those parsers are used as they are.  The
Hermes form is always accepted too: it is what the server asks for when it
injects tools into a template that cannot render them, and what constrained
decoding produces.

A reply never carries call markup as text: a call that does not parse, names
a tool that was not offered, or is cut short by the token limit (and cannot be
closed because its arguments are incomplete) is dropped and logged, never
returned as content, and never crashes a request.  Custom tools (free text
instead of JSON arguments) are written as a JSON header naming the tool, then
the text, inside the same markers.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Union

from mlx_lm import tokenizer_utils
from mlx_lm.generate import TextStateMachine

from mlx_server.vocabulary import CUSTOM_TOOL, FUNCTION_TOOL, ToolCall
from utils_logging import debug

__all__ = [
    "HERMES",
    "LLAMA3_JSON",
    "CallPiece",
    "ContentPiece",
    "ToolCallExtractor",
    "ToolCallFormat",
    "ToolCalling",
    "detect_tool_call_format",
    "mlx_lm_format",
    "new_tool_call_id",
    "parse_tool_calls",
    "tool_kinds",
]

logger = logging.getLogger("mlx")

ParseFunction = Callable[[str], list[dict[str, Any]]]


ToolKinds = Mapping[str, str]
"""The offered tools: name -> ``function`` or ``custom``."""


RepeatPrefix = Callable[[str, dict[str, Any]], "str | None"]
"""How a call's text begins, through its first argument: a new call that writes it repeats the earlier one."""


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model family marks and writes its calls.

    ``end`` is empty for formats whose calls run to the end of the output;
    ``bare_json`` formats (Llama 3) may also write a call with no marker at all.
    ``repeat_prefix`` recognizes a call that starts over (None: not recognized early).
    """

    name: str
    start: str
    end: str
    parse: ParseFunction
    bare_json: bool = False
    repeat_prefix: RepeatPrefix | None = None


def new_tool_call_id() -> str:
    """A fresh id for every call: clients match tool results to calls by it."""
    return f"call_{secrets.token_hex(12)}"


def _as_call(value: Any) -> dict[str, Any]:
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


def _json_values(text: str) -> list[Any]:
    """Every JSON value in ``text``, separated by whitespace, commas or semicolons (nesting-safe, no regex)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,;":
            position += 1
        if position == len(text):
            return values
        value, position = decoder.raw_decode(text, position)
        values.append(value)


def _custom_call(text: str) -> dict[str, Any] | None:
    """``{"name": ...}`` followed by free text on the next lines: a custom tool's call (None if not that shape)."""
    try:
        header, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    rest = text[end:]
    if not isinstance(header, dict) or set(header) != {"name"} or not rest.startswith("\n"):
        return None
    return {"name": header["name"], "input": rest[1:]}


def _parse_json_calls(text: str) -> list[dict[str, Any]]:
    """One or more call objects, or lists of them (Hermes, Qwen 2.5, Llama 3), or one custom tool's call."""
    custom = _custom_call(text.strip(" \t\r").removeprefix("\n").removesuffix("\n"))
    if custom is not None:
        return [_as_call(custom)]
    calls: list[dict[str, Any]] = []
    for value in _json_values(text.strip()):
        calls.extend(_as_call(item) for item in (value if isinstance(value, list) else [value]))
    if not calls:
        raise ValueError("no tool call found")
    return calls


def mlx_lm_format(module_name: str) -> ToolCallFormat:
    """A format backed by one of mlx-lm's own parsers (``mlx_lm.tool_parsers.<name>``)."""
    module = importlib.import_module(f"mlx_lm.tool_parsers.{module_name}")
    parse_one: Callable[[str, Any], Any] = module.parse_tool_call

    def parse(text: str) -> list[dict[str, Any]]:
        parsed = parse_one(text, None)
        return [_as_call(call) for call in (parsed if isinstance(parsed, list) else [parsed])]

    return ToolCallFormat(module_name, module.tool_call_start, module.tool_call_end, parse)


def _json_repeat_prefix(name: str, arguments: dict[str, Any]) -> str | None:
    """``{"name": …, "arguments": {"<first>": <value>`` as the grammar writes it (compact, ", " and ": ")."""
    if not arguments:
        return None
    key, value = next(iter(arguments.items()))
    first = json.dumps({key: value}, ensure_ascii=False, separators=(", ", ": "))[:-1]
    return json.dumps({"name": name, "arguments": {}}, ensure_ascii=False)[:-3] + first


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>", _parse_json_calls, repeat_prefix=_json_repeat_prefix)
LLAMA3_JSON = ToolCallFormat("llama3_json", "<|python_tag|>", "", _parse_json_calls, bare_json=True)


@functools.lru_cache(maxsize=8)
def detect_tool_call_format(tokenizer: Any) -> ToolCallFormat:
    """The format this model's chat template teaches it; Hermes when the template names none.

    mlx-lm infers the parser when it loads a model itself; for GGUF files its
    inference is applied to the template here.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|python_tag|>" in template:
        return LLAMA3_JSON
    infer: Callable[[Any], str | None] | None = getattr(tokenizer_utils, "_infer_tool_parser", None)
    name = None
    if infer is not None:
        try:
            name = infer(getattr(tokenizer, "_tokenizer", tokenizer))
        except Exception:  # noqa: BLE001 - a private helper of mlx-lm; Hermes is the safe default
            name = None
    if name is None or name == "json_tools":
        return HERMES
    try:
        return mlx_lm_format(name)
    except (ImportError, AttributeError):
        return HERMES


def tool_kinds(tools: ToolKinds | Collection[str]) -> dict[str, str]:
    """A name -> kind map; a plain collection of names means functions."""
    if isinstance(tools, Mapping):
        return dict(tools)
    return dict.fromkeys(tools, FUNCTION_TOOL)


def _finish_calls(raw_calls: list[dict[str, Any]], tools: ToolKinds) -> list[ToolCall]:
    """Give each call its id, and JSON arguments (or a custom tool's text); unknown tools are refused."""
    calls = []
    for call in raw_calls:
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


def arguments_object_or_none(arguments: str) -> dict[str, Any] | None:
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _try_parse(text: str, parse: ParseFunction, tools: ToolKinds) -> list[ToolCall] | None:
    try:
        return _finish_calls(parse(text), tools)
    except (ValueError, KeyError, TypeError, SyntaxError) as error:
        logger.debug("Tool call text did not parse (%s); dropped", error)
        return None


def _with_hermes(call_format: ToolCallFormat) -> list[ToolCallFormat]:
    """The model's own format and Hermes; one format that tries both when they share markers (Qwen3-Coder)."""
    if call_format is HERMES:
        return [HERMES]
    if (call_format.start, call_format.end) != (HERMES.start, HERMES.end):
        return [call_format, HERMES]

    def parse_either(text: str) -> list[dict[str, Any]]:
        try:
            return call_format.parse(text)
        except (ValueError, KeyError, TypeError, SyntaxError):
            return HERMES.parse(text)

    return [ToolCallFormat(call_format.name, call_format.start, call_format.end, parse_either, call_format.bare_json)]


@dataclass
class ContentPiece:
    text: str


@dataclass
class CallPiece:
    call: ToolCall


Piece = Union[ContentPiece, CallPiece]


class ToolCallExtractor:
    """Splits generated text, as it streams, into content and complete tool calls.

    Content goes out as soon as it cannot be the start of a call marker
    (mlx-lm's TextStateMachine holds back partial markers); a call goes out
    when its end marker arrives, or at the end for formats without one.  With
    ``parallel`` false only the first call is kept; with ``emit`` false calls
    are recognized and dropped (``tool_choice: none``: markup never becomes
    content).
    """

    def __init__(
        self,
        call_format: ToolCallFormat,
        tools: ToolKinds | Collection[str],
        parallel: bool = True,
        emit: bool = True,
    ) -> None:
        self._formats = {f"tool:{fmt.name}": fmt for fmt in _with_hermes(call_format)}
        normal = [(fmt.start, state) for state, fmt in self._formats.items()]
        transitions: dict[str, list[tuple[str, str]]] = {"normal": normal}
        for state, fmt in self._formats.items():
            transitions[state] = [(fmt.end, "normal")] if fmt.end else []
        self._machine = TextStateMachine(transitions)
        self._state = self._machine.make_state()
        self._format = call_format
        self._tools = tool_kinds(tools)
        self._parallel = parallel
        self._emit = emit
        self._call_text = ""
        self._content_seen = ""
        self._bare_json = ""
        self._pending_space = ""
        self.calls: list[ToolCall] = []
        self.repeated = False  # a call repeated an earlier one: small models loop so until the token limit
        self._repeat_prefixes: list[str] = []  # how each accepted call began, to recognize one starting over

    def feed(self, text: str) -> list[Piece]:
        if self._bare_json or self._starts_bare_json(text):
            self._bare_json += text
            return []
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._pieces(segments)

    def finish(self) -> list[Piece]:
        """Whatever is still held: a call without an end marker, a bare JSON call, or plain text."""
        if self._bare_json:
            calls = _try_parse(self._bare_json, self._format.parse, self._tools)
            return self._accept(calls) if calls else [ContentPiece(self._bare_json)]
        self._state, held, state_name = TextStateMachine.flush(self._state)
        pieces = self._pieces([(state_name, held)]) if held else []
        if state_name in self._formats:
            pieces += self._close_call(state_name)
        if self._pending_space and not self.calls:
            pieces.append(ContentPiece(self._pending_space))
        self._pending_space = ""
        return pieces

    def _starts_bare_json(self, text: str) -> bool:
        """Llama 3 may answer with a bare JSON call; such output is held back until it can be parsed."""
        if not self._format.bare_json or self._content_seen.strip() or self._state[0] != "normal":
            return False
        return (self._content_seen + text).lstrip()[:1] in ("{", "[")

    def _pieces(self, segments: list[tuple[str | None, str]]) -> list[Piece]:
        pieces: list[Piece] = []
        previous = segments[0][0] if segments else None  # the state this chunk started in
        for state_name, text in segments:
            if previous in self._formats and state_name != previous:
                pieces += self._close_call(previous)
            if state_name in self._formats:
                self._call_text += text
                self._check_repeat()
            elif text:
                self._content_seen += text
                pieces += self._content(text)
            previous = state_name
        return pieces

    def _check_repeat(self) -> None:
        """A call being written that began as an earlier one did, through its first argument, is a loop."""
        written = self._call_text.lstrip()
        for prefix in self._repeat_prefixes:
            if self.repeated or not written.startswith(prefix):
                continue
            after = written[len(prefix) : len(prefix) + 1]
            # A number may go on ("2" then "23"); a string, list or object has ended.
            self.repeated = prefix[-1] in '"]}' or (after != "" and after in ", }\n")

    def _close_call(self, state_name: str) -> list[Piece]:
        """A call whose text ended (its end marker, or the end of the output): its calls, or nothing."""
        text, self._call_text = self._call_text, ""
        calls = _try_parse(text, self._formats[state_name].parse, self._tools) if text.strip() else None
        if calls is None:
            if text.strip():
                debug(1, "Dropped tool-call text that did not parse (a repeat cut short, or malformed)", {"text": text})
            return []
        return self._accept(calls)

    def _accept(self, calls: list[ToolCall]) -> list[Piece]:
        """New calls, minus repeats of an earlier one (same function and arguments), one only if not parallel."""
        accepted: list[Piece] = []
        for call in calls:
            seen = any((call.name, call.arguments) == (earlier.name, earlier.arguments) for earlier in self.calls)
            self.repeated = self.repeated or seen
            if seen or (self.calls and not self._parallel):
                continue
            if not self._emit:
                debug(1, "Dropped a tool call: tool_choice is none", {"name": call.name})
                continue
            self.calls.append(call)
            accepted.append(CallPiece(call))
            self._remember_prefix(call)
        if accepted:
            self._pending_space = ""  # whitespace between calls is not content
        return accepted

    def _remember_prefix(self, call: ToolCall) -> None:
        render = self._format.repeat_prefix or HERMES.repeat_prefix
        arguments = arguments_object_or_none(call.arguments)
        prefix = render(call.name, arguments) if render is not None and arguments is not None else None
        if prefix:
            self._repeat_prefixes.append(prefix)

    def _content(self, text: str) -> list[Piece]:
        """Whitespace is held back until real content follows: between and after calls it is dropped."""
        if not text.strip():
            self._pending_space += text
            return []
        text, self._pending_space = self._pending_space + text, ""
        return [ContentPiece(text)]


@dataclass(frozen=True)
class ToolCalling:
    """How one request's output is searched for calls: the format, the offered tools, parallel or not.

    ``emit`` false: calls are recognized and dropped (``tool_choice: none``).
    """

    call_format: ToolCallFormat
    tools: tuple[tuple[str, str], ...]
    parallel: bool = True
    emit: bool = True

    def extractor(self) -> ToolCallExtractor:
        return ToolCallExtractor(self.call_format, dict(self.tools), self.parallel, self.emit)


def parse_tool_calls(
    text: str, call_format: ToolCallFormat, tools: ToolKinds | Collection[str], parallel: bool = True
) -> tuple[str, list[ToolCall]]:
    """A whole output -> (content, calls)."""
    extractor = ToolCallExtractor(call_format, tools, parallel)
    pieces = extractor.feed(text) + extractor.finish()
    content = "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece))
    return content, extractor.calls
