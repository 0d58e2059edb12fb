"""Tool calls as llguidance grammars, in each model family's own format, with its special tokens as tokens.

A model trained to open a call with a special token (Qwen's ``<tool_call>``,
Mistral's ``[TOOL_CALLS]``, gpt-oss's ``<|channel|>``) must be allowed that
token, not the same text spelled in pieces: the grammar names it by id
(``<[151657]>``, llguidance's token syntax).  Arguments follow the tool's
JSON schema: embedded ``%json`` for formats that write JSON, and value
grammars typed by the schema for those that write raw text (Qwen3-Coder's
``<parameter=…>`` blocks, GLM's ``<arg_value>``, Gemma 4's ``<|"|>``
strings, pythonic keyword arguments).

Each builder returns Lark rules that define ``call_<index>`` for one tool;
``calls`` rules (one or several calls) are written by the format itself.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

import llguidance

from mlx_server.vocabulary import CUSTOM_TOOL, Tool

__all__ = [
    "CallGrammar",
    "GrammarWriter",
    "arguments_schema",
    "custom_input_rules",
    "json_call_schema",
    "styled_schema",
    "text_without",
]

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
MAX_PARALLEL_CALLS = 8
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains")

CallGrammar = Callable[["GrammarWriter", int, Tool, bool], list[str]]
"""Lark rules defining ``call_<index>``: one call of one tool, markers included unless ``opened`` (the
output already wrote the call's opening marker, which set off a lazy grammar)."""


def _closed(schema: Any) -> Any:
    """A copy where every object schema with ``properties`` and no ``additionalProperties`` is closed.

    Only subschemas are visited, never ``const``, ``enum`` or ``default`` data.
    """
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: _closed(sub) for name, sub in closed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [_closed(sub) for sub in closed[key]]
    for key in _SCHEMA_VALUES:
        if key in closed:
            closed[key] = _closed(closed[key])
    if isinstance(closed.get("properties"), dict) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def styled_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as generated: objects closed (small models invent keys), compact JSON with ", " and ": "."""
    styled: dict[str, Any] = _closed(copy.deepcopy(schema))
    styled["x-guidance"] = {**JSON_STYLE, **styled.get("x-guidance", {})}
    return styled


def json_call_schema(tool: Tool, arguments_key: str = "arguments") -> dict[str, Any]:
    """``{"name": <the tool>, "arguments": <its schema>}``, the object JSON-writing formats emit."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: arguments_schema(tool)},
        "required": ["name", arguments_key],
    }


def arguments_schema(tool: Tool) -> dict[str, Any]:
    """A function's parameters; a custom tool written as a function takes its text as ``input``."""
    if tool.kind == CUSTOM_TOOL:
        return {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
    return tool.parameters_schema()


def _regex_literal(text: str) -> str:
    return "".join(f"\\{char}" if char in ".^$*+?()[]{}|\\/" else char for char in text)


def text_without(markers: Sequence[str], non_empty: bool = False) -> str:
    """A Lark lexeme body: any text in which none of ``markers`` occurs (llguidance's ``&`` and ``~``)."""
    text = "/(.|\\n)+/" if non_empty else "/(.|\\n)*/"
    if not markers:
        return text
    excluded = "|".join(llguidance.regex_to_lark(_regex_literal(marker)) for marker in markers)
    return f"{text} & ~/(.|\\n)*({excluded})(.|\\n)*/"


def _bounded(text: str, schema: dict[str, Any]) -> str:
    """A text lexeme held to the schema's ``maxLength`` (and ``minLength``), when it sets one."""
    longest, shortest = schema.get("maxLength"), schema.get("minLength", 0)
    if not isinstance(longest, int) and not shortest:
        return text
    upper = str(longest) if isinstance(longest, int) else ""
    return f"{text} & /(.|\\n){{{int(shortest)},{upper}}}/"


class GrammarWriter:
    """Lark pieces in one model's vocabulary: a marker that is a single special token is written as that token."""

    def __init__(self, special_tokens: dict[str, int]) -> None:
        self._special = special_tokens
        self._lexemes = 0

    def mark(self, text: str) -> str:
        """The marker as its token when the vocabulary has one for it, else as text."""
        token = self._special.get(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def is_token(self, text: str) -> bool:
        return text in self._special

    def special_ids(self) -> list[int]:
        return sorted(set(self._special.values()))

    def token_id(self, text: str) -> int | None:
        return self._special.get(text)

    def json(self, schema: dict[str, Any]) -> str:
        return "%json " + json.dumps(styled_schema(schema))

    def lexeme(self, body: str, rules: list[str], max_tokens: int | None = None) -> str:
        """A fresh terminal for ``body`` (a Lark terminal definition), added to ``rules``; returns its name.

        ``max_tokens`` ends the terminal after that many tokens (llguidance's attribute for terminals).
        """
        self._lexemes += 1
        if max_tokens is None:
            name = f"LEXEME_{self._lexemes}"
            rules.append(f"{name}: {body}")
        else:  # a rule of one lexeme, the only place llguidance takes the attribute
            name = f"bounded_{self._lexemes}"
            rules.append(f"{name}[max_tokens={max_tokens}]: {body}")
        return name

    # -- values written as raw text, typed by the schema ---------------------------------------------------

    def raw_value(self, schema: dict[str, Any], closing: str, rules: list[str]) -> str:
        """A value written without JSON quoting (Qwen3-Coder, GLM): strings raw, everything else as JSON."""
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(item, str) for item in enum):
            return "(" + " | ".join(json.dumps(item) for item in enum) + ")"
        if schema.get("type") == "string" and "const" not in schema:
            return self.lexeme(_bounded(text_without([closing]), schema), rules)
        return self.json(schema)

    def gemma_value(self, schema: dict[str, Any], rules: list[str], depth: int = 0) -> str:
        """Gemma 4's values: strings between ``<|"|>`` tokens, bare keys, numbers and booleans as JSON."""
        quote = self.mark('<|"|>')
        kind = schema.get("type")
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(item, str) for item in enum):
            return f"{quote} (" + " | ".join(json.dumps(item) for item in enum) + f") {quote}"
        if kind == "string":
            text = _bounded(text_without(['<|"|>']), schema)
            return f"{quote} {self.lexeme(text, rules)} {quote}"
        if kind == "object" and isinstance(schema.get("properties"), dict) and depth < 4:
            return self.keyword_arguments(schema, rules, "{", "}", ":", depth + 1, self.gemma_value)
        if kind == "array" and isinstance(schema.get("items"), dict) and depth < 4:
            item = self.gemma_value(schema["items"], rules, depth + 1)
            return f'"[" ({item} ("," {item})*)? "]"'
        return self.json(schema)

    def keyword_arguments(
        self,
        schema: dict[str, Any],
        rules: list[str],
        opening: str,
        closing: str,
        assign: str,
        depth: int,
        value: Callable[[dict[str, Any], list[str], int], str],
        separator: str = ",",
    ) -> str:
        """``{key:value,...}`` or ``(key=value, ...)``: the schema's properties in order, required ones always.

        Any optional property may be left out, with separators only between those written.
        """
        properties: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        items = [
            f"{json.dumps(key + assign)} {value(sub if isinstance(sub, dict) else {}, rules, depth)}"
            for key, sub in properties.items()
        ]
        optional = [key not in required for key in properties]
        gap = json.dumps(separator)

        def after(index: int) -> str:  # something was written before ``index``
            if index == len(items):
                return ""
            item = f"{gap} {items[index]}"
            return (f"({item})? " if optional[index] else f"{item} ") + after(index + 1)

        def first(index: int) -> str:  # nothing written yet
            if index == len(items):
                return ""
            written = f"{items[index]} {after(index + 1)}"
            if not optional[index]:
                return written
            rest = first(index + 1)
            return f"({written} | {rest})" if rest.strip() else f"({written})?"

        return f"{json.dumps(opening)} {first(0)} {json.dumps(closing)}"


# -- one call of one tool, per format ----------------------------------------------------------------------


def json_tagged(start: str, end: str, arguments_key: str = "arguments") -> CallGrammar:
    """``<start>\\n{"name": …, "arguments": …}\\n<end>``: Hermes, Qwen 2.5 and Qwen3."""

    def rules(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
        if tool.kind == CUSTOM_TOOL:
            return _hermes_custom(writer, index, tool, start, end, opened)
        body = writer.json(json_call_schema(tool, arguments_key))
        opening = "" if opened else writer.mark(start)
        return [f'call_{index}: {opening} "\\n" {body} "\\n" {writer.mark(end)}']

    return rules


def json_bare(arguments_key: str) -> CallGrammar:
    """``{"name": …, "parameters": …}`` with no markers: Llama 3.1."""

    def rules(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
        return [f"call_{index}: {writer.json(json_call_schema(tool, arguments_key))}"]

    return rules


def json_object(arguments_key: str = "arguments") -> CallGrammar:
    """One ``{"name": …, "arguments": …}`` object, for formats that list them (Mistral)."""
    return json_bare(arguments_key)


def mistral_header(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``[TOOL_CALLS]name[ARGS]{…}``: Mistral's newer tokenizers and Devstral."""
    start = "" if opened else writer.mark("[TOOL_CALLS]")
    body = f"{json.dumps(tool.name)} {writer.mark('[ARGS]')} {writer.json(arguments_schema(tool))}"
    return [f"call_{index}: {start} {body}"]


def _parameters(
    writer: GrammarWriter, tool: Tool, terminator: str, pair: Callable[[str, str], str], rules: list[str]
) -> list[str]:
    """One ``pair(key, value)`` per argument of a format that writes values raw up to ``terminator``.

    Optional arguments may be left out; the value rules go into ``rules``.
    """
    schema = arguments_schema(tool)
    properties: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    parameters = []
    for key, subschema in properties.items():
        value = writer.raw_value(subschema if isinstance(subschema, dict) else {}, terminator, rules)
        parameters.append(pair(key, value) if key in required else f"({pair(key, value)})?")
    return parameters


def qwen3_coder(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``<tool_call>\\n<function=name>\\n<parameter=key>\\nvalue\\n</parameter>\\n…</function>\\n</tool_call>``."""
    rules: list[str] = []
    parameters = _parameters(
        writer, tool, "\n</parameter>", lambda key, value: f'"<parameter={key}>\\n" {value} "\\n</parameter>\\n"', rules
    )
    opening = f'{"" if opened else writer.mark("<tool_call>")} "\\n<function={tool.name}>\\n"'
    closing = f'"</function>\\n" {writer.mark("</tool_call>")}'
    rules.append(f"call_{index}: {opening} {' '.join(parameters)} {closing}")
    return rules


def glm(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``<tool_call>name\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n…</tool_call>``: GLM 4.5-4.7."""
    rules: list[str] = []

    def pair(key: str, value: str) -> str:
        return (f'{writer.mark("<arg_key>")} {json.dumps(key)} {writer.mark("</arg_key>")} "\\n" '
                f'{writer.mark("<arg_value>")} {value} {writer.mark("</arg_value>")} "\\n"')  # fmt: skip

    arguments = _parameters(writer, tool, "</arg_value>", pair, rules)
    opening = "" if opened else writer.mark("<tool_call>")
    rules.append(
        f'call_{index}: {opening} {json.dumps(tool.name)} "\\n" {" ".join(arguments)} {writer.mark("</tool_call>")}'
    )
    return rules


def kimi(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``<|tool_call_begin|>functions.name:0<|tool_call_argument_begin|>{…}<|tool_call_end|>``: Kimi K2."""
    begin = writer.mark("<|tool_call_begin|>")
    argument, end = writer.mark("<|tool_call_argument_begin|>"), writer.mark("<|tool_call_end|>")
    rules: list[str] = []
    number = writer.lexeme("/[0-9]+/", rules)
    body = f'"functions.{tool.name}:" {number} {argument} {writer.json(arguments_schema(tool))}'
    return [*rules, f"call_{index}: {begin} {body} {end}"]


def gemma4(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``<|tool_call>call:name{key:<|"|>text<|"|>,n:5}<tool_call|>``: Gemma 4."""
    rules: list[str] = []
    arguments = writer.keyword_arguments(arguments_schema(tool), rules, "{", "}", ":", 0, writer.gemma_value)
    opening = "" if opened else writer.mark("<|tool_call>")
    rules.append(f"call_{index}: {opening} {json.dumps('call:' + tool.name)} {arguments} {writer.mark('<tool_call|>')}")
    return rules


def pythonic(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``name(key="text", n=5)``, listed between ``<|tool_call_start|>[`` and ``]<|tool_call_end|>``: LFM2."""
    rules: list[str] = []

    def value(schema: dict[str, Any], _rules: list[str], _depth: int) -> str:
        return writer.json(schema)

    arguments = writer.keyword_arguments(arguments_schema(tool), rules, "(", ")", "=", 0, value, separator=", ")
    rules.append(f"call_{index}: {json.dumps(tool.name)} {arguments}")
    return rules


def harmony(writer: GrammarWriter, index: int, tool: Tool, opened: bool) -> list[str]:
    """``<|channel|>commentary to=functions.name <|constrain|>json<|message|>{…}``, ended by ``<|call|>``: gpt-oss."""
    constrain, message = writer.mark("<|constrain|>"), writer.mark("<|message|>")
    opening = "" if opened else f'{writer.mark("<|channel|>")} "commentary to="'
    return [
        f'call_{index}: {opening} "functions.{tool.name} " {constrain} "json" {message} '
        f"{writer.json(arguments_schema(tool))}"
    ]


def _hermes_custom(writer: GrammarWriter, index: int, tool: Tool, start: str, end: str, opened: bool) -> list[str]:
    """A custom tool's call in the Hermes form: its name as a JSON header, then its text (under its own grammar)."""
    header = json.dumps(json.dumps({"name": tool.name}, ensure_ascii=False) + "\n")
    opening = "" if opened else writer.mark(start)
    rules = [f'call_{index}: {opening} "\\n" {header} input_{index} "\\n" {writer.mark(end)}']
    return rules + custom_input_rules(index, tool, end)


def custom_input_rules(index: int, tool: Tool, end: str = "</tool_call>") -> list[str]:
    """The text of a custom tool's call: its own Lark or regex grammar, or any text that does not close the call."""
    name = f"input_{index}"
    if tool.grammar is None:
        return [f"{name.upper()}: {text_without([end])}", f"{name}: {name.upper()}"]
    if tool.grammar.syntax == "regex":
        return [f"{name}: /{llguidance.regex_to_lark(tool.grammar.definition)}/"]
    return [f"{name}: %lark {{\n{tool.grammar.definition}\n}}"]
