"""How each model family writes tool calls: its markers, its parser, its grammar, and where a call truly ends.

Every family writes calls its own way.  mlx-lm ships a parser for most of
them and infers from the chat template which one a model uses; those parsers
are used as they are (with the offered tools, so that values are typed by
their schemas).  mlx-lm has none for gpt-oss's harmony format, and Llama
3.1's bare JSON is accepted alongside its ``<|python_tag|>`` form; those two
are parsed here.  The Hermes form is what the server asks for when it
injects tools into a template that cannot render them.

A call ends where its format ends, never at marker text inside an argument:
a file an agent writes may well contain ``</tool_call>``, so a closing
marker that falls inside a JSON string (or inside an open ``<parameter>``)
is part of the argument (``inside_argument``).
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlx_server.chat import call_grammars
from mlx_server.chat.call_grammars import CallGrammar, GrammarWriter
from mlx_server.mlx_lm_compat import hf_tokenizer, infer_tool_parser

__all__ = [
    "HARMONY",
    "HERMES",
    "LLAMA3_JSON",
    "ToolCallFormat",
    "detect_tool_call_format",
    "format_named",
    "special_tokens",
]

ParseFunction = Callable[[str, Sequence[dict[str, Any]]], list[dict[str, Any]]]
"""The text between a call's markers, and the offered tools (Hugging Face's template form) -> raw calls."""


def inside_json_string(text: str) -> bool:
    """Whether ``text`` ends inside a JSON string literal (an odd number of unescaped quotes)."""
    inside = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = inside
        elif char == '"':
            inside = not inside
    return inside


def _inside_tag(opening: str, closing: str) -> Callable[[str], bool]:
    """Whether ``text`` ends after an ``opening`` tag that was not closed (raw values: Qwen3-Coder, GLM)."""
    return lambda text: text.rfind(opening) > text.rfind(closing)


def _inside_gemma_string(text: str) -> bool:
    return text.count('<|"|>') % 2 == 1


@dataclass(frozen=True)
class ToolCallFormat:
    """One family's way of writing calls.

    ``start`` and ``end`` are the markers as decoded text (``end`` empty:
    calls run to the end of the output); ``call`` writes one call's grammar
    and ``separator`` goes between parallel calls.  Formats that list calls
    under one marker pair (``outer``) write them between ``list_start`` and
    ``list_end``.  ``bare_json`` formats (Llama 3) may also write a call with
    no marker.
    """

    name: str
    start: str
    end: str
    parse: ParseFunction
    call: CallGrammar
    separator: str = "\n"
    outer: tuple[str, str] = ("", "")
    list_start: str = ""
    list_end: str = ""
    parallel: bool = True
    bare_json: bool = False
    inside_argument: Callable[[str], bool] = inside_json_string
    repeat_prefix: Callable[[str, dict[str, Any]], str | None] | None = None


# -- parsers -------------------------------------------------------------------------------------------


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


def parse_json_calls(text: str, _tools: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One or more call objects, or lists of them (Hermes, Qwen, Llama 3), or one custom tool's call."""
    custom = _custom_call(text.strip(" \t\r").removeprefix("\n").removesuffix("\n"))
    if custom is not None:
        return [custom]
    calls: list[dict[str, Any]] = []
    for value in _json_values(text.strip()):
        calls.extend(value if isinstance(value, list) else [value])
    if not calls:
        raise ValueError("no tool call found")
    return calls


def _mlx_lm_parser(module_name: str) -> tuple[ParseFunction, str, str]:
    """One of mlx-lm's parsers (``mlx_lm.tool_parsers.<name>``), with its markers."""
    module = importlib.import_module(f"mlx_lm.tool_parsers.{module_name}")
    parse_one: Callable[[str, Any], Any] = module.parse_tool_call

    def parse(text: str, tools: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        parsed = parse_one(text, list(tools) or None)
        return parsed if isinstance(parsed, list) else [parsed]

    return parse, str(module.tool_call_start), str(module.tool_call_end)


_HARMONY_HEADER = re.compile(r"^\s*commentary to=functions\.([\w.-]+)\s*(?:<\|constrain\|>\s*json)?\s*<\|message\|>")


def parse_harmony_call(text: str, _tools: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """``commentary to=functions.name <|constrain|>json<|message|>{…}`` (what follows ``<|channel|>``)."""
    match = _HARMONY_HEADER.match(text)
    if match is None:
        raise ValueError("not a harmony function call")
    arguments, _ = json.JSONDecoder().raw_decode(text[match.end() :].strip())
    return [{"name": match.group(1), "arguments": arguments}]


def json_repeat_prefix(name: str, arguments: dict[str, Any]) -> str | None:
    """``{"name": …, "arguments": {"<first>": <value>`` as the grammar writes it (compact, ", " and ": ")."""
    if not arguments:
        return None
    key, value = next(iter(arguments.items()))
    first = json.dumps({key: value}, ensure_ascii=False, separators=(", ", ": "))[:-1]
    return json.dumps({"name": name, "arguments": {}}, ensure_ascii=False)[:-3] + first


# -- the formats ----------------------------------------------------------------------------------------

HERMES = ToolCallFormat(
    "hermes",
    "<tool_call>",
    "</tool_call>",
    parse_json_calls,
    call_grammars.json_tagged("<tool_call>", "</tool_call>"),
    repeat_prefix=json_repeat_prefix,
)
LLAMA3_JSON = ToolCallFormat(
    "llama3_json",
    "<|python_tag|>",
    "",
    parse_json_calls,
    call_grammars.json_bare("parameters"),
    separator="; ",
    parallel=False,
    bare_json=True,
)
HARMONY = ToolCallFormat(
    "harmony",
    "<|channel|>commentary to=",
    "",
    lambda text, tools: parse_harmony_call("commentary to=" + text, tools),
    call_grammars.harmony,
    parallel=False,
)


def _from_mlx_lm(name: str, call: CallGrammar, **fields: Any) -> ToolCallFormat:
    parse, start, end = _mlx_lm_parser(name)
    return ToolCallFormat(name, start, end, parse, call, **fields)


@functools.cache
def format_named(name: str) -> ToolCallFormat:
    """The format of this name (mlx-lm's parser names, ``hermes``, ``llama3_json``, ``harmony``)."""
    builders: dict[str, Callable[[], ToolCallFormat]] = {
        "hermes": lambda: HERMES,
        "json_tools": lambda: HERMES,
        "llama3_json": lambda: LLAMA3_JSON,
        "harmony": lambda: HARMONY,
        "qwen3_coder": lambda: _from_mlx_lm(
            "qwen3_coder", call_grammars.qwen3_coder, inside_argument=_inside_tag("<parameter=", "</parameter>")
        ),
        "mistral": lambda: _from_mlx_lm(
            "mistral",
            call_grammars.json_object(),
            separator=", ",
            outer=("[TOOL_CALLS]", ""),
            list_start="[",
            list_end="]",
            repeat_prefix=json_repeat_prefix,
        ),
        "mistral_args": lambda: ToolCallFormat(
            "mistral_args", "[TOOL_CALLS]", "", _mlx_lm_parser("mistral")[0], call_grammars.mistral_header, separator=""
        ),
        "glm47": lambda: _from_mlx_lm(
            "glm47", call_grammars.glm, inside_argument=_inside_tag("<arg_value>", "</arg_value>")
        ),
        "kimi_k2": lambda: _from_mlx_lm(
            "kimi_k2",
            call_grammars.kimi,
            separator="",
            outer=("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
        ),
        "gemma4": lambda: _from_mlx_lm("gemma4", call_grammars.gemma4, inside_argument=_inside_gemma_string),
        "pythonic": lambda: _from_mlx_lm(
            "pythonic",
            call_grammars.pythonic,
            separator=", ",
            outer=("<|tool_call_start|>", "<|tool_call_end|>"),
            list_start="[",
            list_end="]",
        ),
    }
    return builders.get(name, builders["hermes"])()


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's added tokens (text -> id): markers a model writes as one token."""
    inner = hf_tokenizer(tokenizer)
    added = inner.get_added_vocab() if hasattr(inner, "get_added_vocab") else {}
    return {str(text): int(token) for text, token in added.items()}


def detect_tool_call_format(tokenizer: Any) -> ToolCallFormat:
    """The format this model's chat template teaches it; Hermes when it names none (worked out once per model).

    gpt-oss is recognized by its harmony tokens, Llama 3.1 by ``<|python_tag|>``
    in its template, Mistral's newer form by ``[ARGS]``; the rest is the parser
    mlx-lm chose when it loaded the tokenizer (``tool_parser_type`` in its
    config, or inferred from the template), or mlx-lm's inference for a
    tokenizer it did not load (a GGUF file's).
    """
    vocabulary = special_tokens(tokenizer)
    if {"<|channel|>", "<|message|>", "<|constrain|>"} <= set(vocabulary):
        return HARMONY
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|python_tag|>" in template:
        return LLAMA3_JSON
    chosen = getattr(tokenizer, "tool_parser", None)
    module = getattr(chosen, "__module__", "") or ""
    name = module.rpartition(".")[2] if module.startswith("mlx_lm.tool_parsers.") else infer_tool_parser(tokenizer)
    if name == "mistral" and isinstance(template, str) and "[ARGS]" in template:
        name = "mistral_args"
    try:
        return format_named(name or "hermes")
    except (ImportError, AttributeError):
        return HERMES


def grammar_writer(tokenizer: Any) -> GrammarWriter:
    """A grammar writer in this tokenizer's vocabulary (reads its added tokens: a model's profile keeps them)."""
    return GrammarWriter(special_tokens(tokenizer))
