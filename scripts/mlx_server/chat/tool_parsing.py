"""Tool calls out of generated text, whole or as it streams, in the model's own format (``call_formats``).

A reply never carries call markup as text: a call that does not parse, names
a tool that was not offered, or is cut short by the token limit (and cannot be
closed because its arguments are incomplete) is dropped and logged, never
returned as content, and never crashes a request.  Custom tools (free text
instead of JSON arguments) are written in the Hermes form as a JSON header
naming the tool, then the text; in other formats, as a function taking
``input``.

A function call streams as it is written: its name as soon as it is known
(``CallStartPiece``), then what is certain of its arguments
(``CallArgumentsPiece``, from ``partial_calls``), and the whole call once it
ends (``CallPiece``, whose arguments the streamed pieces add up to exactly).
A call that might still turn out to repeat an earlier one, or that would not
be kept (not offered, ``parallel`` off, ``tool_choice: none``), is not
streamed; one that was streamed and then does not parse (cut short by the
token limit) ends with ``CallAbandonedPiece``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine

from mlx_server.chat.call_formats import HERMES, ToolCallFormat
from mlx_server.chat.call_pieces import (
    CallAbandonedPiece,
    CallArgumentsPiece,
    CallPiece,
    CallStartPiece,
    ContentPiece,
    Piece,
    ToolKinds,
    arguments_object,
    finish_calls,
    new_tool_call_id,
    tool_kinds,
)
from mlx_server.chat.partial_calls import partial_calls
from mlx_server.vocabulary import FUNCTION_TOOL, ToolCall
from utils_logging import debug

__all__ = ["ToolCallExtractor", "ToolCalling", "parse_tool_calls"]

logger = logging.getLogger("mlx")

NORMAL = "normal"


@dataclass
class _Stream:
    """One call of the block being written, as streamed so far."""

    index: int
    id: str
    name: str
    sent: str = ""


def _formats(call_format: ToolCallFormat) -> list[ToolCallFormat]:
    """The model's own format and Hermes (what injected tool blocks ask for), unless they share a start marker."""
    if call_format.start == HERMES.start or call_format is HERMES:
        return [call_format]
    return [call_format, HERMES]


class ToolCallExtractor:
    """Splits generated text, as it streams, into content and complete tool calls.

    Content goes out as soon as it cannot be the start of a call marker
    (mlx-lm's TextStateMachine holds back partial markers).  Inside a call,
    text is kept until the format's end marker arrives outside an argument,
    or until the output ends for formats without one.  With ``parallel``
    false only the first call is kept; with ``emit`` false calls are
    recognized and dropped (``tool_choice: none``: markup never becomes
    content).  ``schemas`` (the tools in the template's form) type the
    values of formats that write them as raw text.
    """

    def __init__(
        self,
        call_format: ToolCallFormat,
        tools: ToolKinds | Collection[str],
        parallel: bool = True,
        emit: bool = True,
        schemas: Sequence[dict[str, Any]] = (),
    ) -> None:
        self._formats = {f"tool:{index}": fmt for index, fmt in enumerate(_formats(call_format))}
        transitions = {NORMAL: [(fmt.start, state) for state, fmt in self._formats.items()]}
        self._machine = TextStateMachine({**transitions, **{state: [] for state in self._formats}})
        self._state = self._machine.make_state()
        self._format = call_format
        self._tools = tool_kinds(tools)
        self._schemas = list(schemas)
        self._parallel = parallel
        self._emit = emit
        self._open: ToolCallFormat | None = None  # the format of the call being written
        self._call_text = ""
        self._searched = 0  # how far the call text was searched for its end marker
        self._content_seen = ""
        self._bare_json = ""
        self._pending_space = ""
        self._after_content = False  # the last thing that went out was content (not a call)
        self._streams: list[_Stream | None] = []  # the open block's calls: streamed (or None: not streamed)
        self._next_index = 0
        self._repeat_prefixes: list[str] = []  # how each accepted call began, to recognize one starting over
        self.repeated = False  # a call repeated an earlier one: small models loop so until the token limit
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Piece]:
        if self._bare_json or self._starts_bare_json(text):
            self._bare_json += text
            return []
        pieces: list[Piece] = []
        while text:
            if self._open is not None:
                self._call_text += text
                text = self._close_if_ended(pieces)
                continue
            self._state, segments = TextStateMachine.split(self._state, text)
            text = ""
            for state_name, segment in segments:
                if state_name in self._formats:
                    self._open = self._formats[state_name]
                    self._call_text += segment
                elif segment:
                    self._content_seen += segment
                    pieces += self._content(segment)
            if self._open is not None:
                text = self._close_if_ended(pieces)
        return pieces

    def finish(self) -> list[Piece]:
        """Whatever is still held: a call without an end marker, a bare JSON call, or plain text."""
        if self._bare_json:
            calls = self._parse(self._bare_json, self._format)
            return self._accept(calls) if calls else [ContentPiece(self._bare_json)]
        pieces: list[Piece] = []
        if self._open is not None:
            pieces += self._close_call(self._call_text)
        else:
            self._state, held, _ = TextStateMachine.flush(self._state)
            if held:
                pieces += self._content(held)
        self._pending_space = self._flushed_space(pieces)
        return pieces

    # -- calls ------------------------------------------------------------------

    def _close_if_ended(self, pieces: list[Piece]) -> str:
        """Close the open call at its end marker (outside an argument); returns the text after it."""
        fmt = self._open
        assert fmt is not None
        self._check_repeat()
        if not fmt.end:
            self._stream(self._call_text, pieces)
            return ""
        while (at := self._call_text.find(fmt.end, self._searched)) >= 0:
            if fmt.inside_argument(self._call_text[:at]):
                self._searched = at + 1  # marker text inside an argument: part of it
                continue
            body, rest = self._call_text[:at], self._call_text[at + len(fmt.end) :]
            pieces += self._close_call(body)
            self._state = self._machine.make_state()
            return rest
        self._searched = max(self._searched, len(self._call_text) - len(fmt.end) + 1)
        self._stream(self._call_text, pieces)  # the readers stop where a value ends: a half end marker is not read
        return ""

    def _stream(self, text: str, pieces: list[Piece]) -> None:
        """Start the open block's calls that may be streamed, and send what became certain of their arguments."""
        fmt = self._open
        if fmt is None or not self._emit:
            return
        for position, partial in enumerate(partial_calls(fmt.name, text, self._schemas)):
            if position == len(self._streams):
                if not self._may_stream(partial.name, partial.arguments):
                    return  # later calls of the block wait for this one
                assert partial.name is not None
                stream = _Stream(self._next_index, new_tool_call_id(), partial.name)
                self._next_index += 1
                self._streams.append(stream)
                self._pending_space = self._flushed_space(pieces)
                self._after_content = False
                pieces.append(CallStartPiece(stream.index, stream.id, stream.name))
            current = self._streams[position]
            if current is None:
                return
            if len(partial.arguments) > len(current.sent) and partial.arguments.startswith(current.sent):
                pieces.append(CallArgumentsPiece(current.index, partial.arguments[len(current.sent) :]))
                current.sent = partial.arguments

    def _may_stream(self, name: str | None, arguments: str) -> bool:
        """A function being called that will be kept: offered, allowed, and no longer possibly a repeat."""
        if name is None or self._tools.get(name) != FUNCTION_TOOL or self.repeated:
            return False
        if not self._parallel and (self.calls or self._streams):
            return False
        return not any(earlier.name == name and earlier.arguments.startswith(arguments) for earlier in self.calls)

    def _close_call(self, text: str) -> list[Piece]:
        """A call whose text ended (its end marker, or the end of the output): its calls, or nothing."""
        fmt = self._open or self._format
        if fmt.end and self._open is not None:
            pieces: list[Piece] = []
            self._stream(text, pieces)
        else:
            pieces = []
        streams, self._streams = self._streams, []
        self._open, self._call_text, self._searched = None, "", 0
        calls = self._parse(text, fmt) if text.strip() else None
        if calls is None:
            if text.strip():
                debug(1, "Dropped tool-call text that did not parse (a repeat cut short, or malformed)", {"text": text})
            return pieces + [CallAbandonedPiece(stream.index) for stream in streams if stream is not None]
        return pieces + self._accept(calls, streams)

    def _parse(self, text: str, fmt: ToolCallFormat) -> list[ToolCall] | None:
        try:
            return finish_calls(fmt.parse(text, self._schemas), self._tools)
        except (ValueError, KeyError, TypeError, SyntaxError, AttributeError) as error:
            logger.debug("Tool call text did not parse (%s); dropped", error)
            if fmt is not HERMES and fmt.start == HERMES.start:  # Qwen3-Coder's markers, Hermes's body
                return self._parse(text, HERMES)
            return None

    def _starts_bare_json(self, text: str) -> bool:
        """Llama 3 may answer with a bare JSON call; such output is held back until it can be parsed."""
        if not self._format.bare_json or self._content_seen.strip() or self._open is not None:
            return False
        return (self._content_seen + text).lstrip()[:1] in ("{", "[")

    def _check_repeat(self) -> None:
        """A call being written that began as an earlier one did, through its first argument, is a loop."""
        written = self._call_text.lstrip()
        for prefix in self._repeat_prefixes:
            if self.repeated or not written.startswith(prefix):
                continue
            after = written[len(prefix) : len(prefix) + 1]
            # A number may go on ("2" then "23"); a string, list or object has ended.
            self.repeated = prefix[-1] in '"]}' or (after != "" and after in ", }\n")

    def _accept(self, calls: list[ToolCall], streams: Sequence[_Stream | None] = ()) -> list[Piece]:
        """New calls, minus repeats of an earlier one (same function and arguments), one only if not parallel.

        ``streams`` are the block's streamed calls, in order: a kept call that was streamed keeps its id and
        index and gets the rest of its arguments; one that was streamed and is not kept is abandoned.
        """
        accepted: list[Piece] = []
        for position, call in enumerate(calls):
            stream = streams[position] if position < len(streams) else None
            seen = any((call.name, call.arguments) == (earlier.name, earlier.arguments) for earlier in self.calls)
            self.repeated = self.repeated or seen
            if seen or (self.calls and not self._parallel) or not self._emit:
                if not self._emit:
                    debug(1, "Dropped a tool call: tool_choice is none", {"name": call.name})
                if stream is not None:
                    accepted.append(CallAbandonedPiece(stream.index))
                continue
            if not accepted:
                self._pending_space = self._flushed_space(accepted)
            if stream is None:
                accepted.append(CallPiece(call, self._next_index))
                self._next_index += 1
            else:
                call = ToolCall(stream.id, call.name, call.arguments, call.kind)
                if call.arguments.startswith(stream.sent):
                    rest = call.arguments[len(stream.sent) :]
                    accepted += [CallArgumentsPiece(stream.index, rest)] if rest else []
                else:  # the readers mirror the parsers; this is a bug, said plainly rather than hidden
                    logger.warning("A streamed call's arguments were not a prefix of its final ones: %s", call.name)
                accepted.append(CallPiece(call, stream.index, streamed=True))
            self.calls.append(call)
            self._after_content = False
            self._remember_prefix(call)
        for stream in streams[len(calls) :]:
            if stream is not None:
                accepted.append(CallAbandonedPiece(stream.index))
        return accepted

    def _flushed_space(self, pieces: list[Piece]) -> str:
        """Whitespace held back when a call begins: content if it followed content, else dropped; returns ''."""
        if self._pending_space and self._after_content:
            pieces.append(ContentPiece(self._pending_space))
        return ""

    def _remember_prefix(self, call: ToolCall) -> None:
        render = self._format.repeat_prefix or HERMES.repeat_prefix
        arguments = arguments_object(call.arguments)
        prefix = render(call.name, arguments) if render is not None and arguments is not None else None
        if prefix:
            self._repeat_prefixes.append(prefix)

    def _content(self, text: str) -> list[Piece]:
        """Whitespace is held back until what follows says what it is: before content, or after content and
        before a call or the end, it is content; at the start before a call, between calls and after them, not.
        (So the streamed content never depends on where the text was cut into pieces.)"""
        if not text.strip():
            self._pending_space += text
            return []
        text, self._pending_space = self._pending_space + text, ""
        self._after_content = True
        return [ContentPiece(text)]


@dataclass(frozen=True)
class ToolCalling:
    """How one request's output is searched for calls: the format, the offered tools, parallel or not.

    ``emit`` false: calls are recognized and dropped (``tool_choice: none``).
    ``schemas`` are the tools in the chat template's form, to type raw values.
    """

    call_format: ToolCallFormat
    tools: tuple[tuple[str, str], ...]
    parallel: bool = True
    emit: bool = True
    schemas: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def extractor(self) -> ToolCallExtractor:
        return ToolCallExtractor(self.call_format, dict(self.tools), self.parallel, self.emit, self.schemas)


def parse_tool_calls(
    text: str,
    call_format: ToolCallFormat,
    tools: ToolKinds | Collection[str],
    parallel: bool = True,
    schemas: Sequence[dict[str, Any]] = (),
) -> tuple[str, list[ToolCall]]:
    """A whole output -> (content, calls)."""
    extractor = ToolCallExtractor(call_format, tools, parallel, schemas=schemas)
    pieces = extractor.feed(text) + extractor.finish()
    content = "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece))
    return content, extractor.calls
