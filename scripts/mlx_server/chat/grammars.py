"""The grammars that make forced tool calls and JSON output always parse (llguidance's Lark dialect).

A request that must call a tool (``tool_choice`` ``required`` or a named
function) or must answer in JSON (``response_format``) gets a grammar, which
the engine enforces token by token (``engine.constrained``): the result parses
and validates by construction.

The grammar is a Lark grammar with embedded JSON schemas.  Tool calls are
written in the Hermes form (``<tool_call>{"name": …, "arguments": …}</tool_call>``),
which the tool-call parser always accepts; a custom tool's call is its name
as a JSON header, then its text, under the tool's own Lark or regex grammar
when it has one.  Under ``tool_choice: none`` with tools offered, the output
is free text that cannot contain a call's opening marker.  Object schemas that leave
``additionalProperties`` open are closed for generation (the output still
validates against the schema as given): a small model otherwise fills
arguments with invented keys.  JSON is written compactly, with ``", "`` and
``": "`` separators as models are trained to write it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance

from mlx_server.vocabulary import CUSTOM_TOOL, GrammarError, Tool

__all__ = ["OutputConstraint", "build_grammar", "check_schema"]

MAX_PARALLEL_CALLS = 8
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


@dataclass(frozen=True)
class OutputConstraint:
    """What a request's output must be.

    ``tool_mode`` is ``none``, ``auto`` or ``required``.  Required calls, and
    JSON output, are constrained; with ``auto`` and a JSON response format the
    output is either calls or the JSON; ``auto`` alone stays free.
    """

    tools: Sequence[Tool] = ()
    tool_mode: str = "none"
    forced_function: str | None = None
    parallel_calls: bool = True
    json_schema: dict[str, Any] | None = None
    forbidden_markers: tuple[str, ...] = ()  # text that must never appear (call openings under "none")

    @property
    def constrained(self) -> bool:
        return self.tool_mode == "required" or self.json_schema is not None or bool(self.forbidden_markers)


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


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


def _with_style(schema: dict[str, Any]) -> dict[str, Any]:
    styled: dict[str, Any] = _closed(copy.deepcopy(schema))
    styled["x-guidance"] = {**_JSON_STYLE, **styled.get("x-guidance", {})}
    return styled


_validated: OrderedDict[str, str] = OrderedDict()
_validated_lock = threading.Lock()
_VALIDATED_ENTRIES = 512


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Raise GrammarError naming the problem when llguidance cannot compile ``schema`` (results memoized)."""
    key = hashlib.sha256(json.dumps(schema, sort_keys=True, default=str).encode()).hexdigest()
    with _validated_lock:
        error = _validated.get(key)
    if error is None:
        try:
            error = llguidance.LLMatcher.validate_grammar(
                llguidance.LLMatcher.grammar_from_json_schema(_with_style(schema))
            )
        except (ValueError, TypeError) as problem:
            error = str(problem)
        with _validated_lock:
            _validated[key] = error
            while len(_validated) > _VALIDATED_ENTRIES:
                _validated.popitem(last=False)
    if error:
        raise GrammarError(param, f"invalid JSON schema in {param}: {error}")


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters_schema()},
        "required": ["name", "arguments"],
    }


def _text_without(markers: Sequence[str]) -> str:
    """A Lark lexeme body: any text in which none of ``markers`` occurs (llguidance's ``&`` and ``~``)."""
    excluded = "|".join(llguidance.regex_to_lark(_regex_literal(marker)) for marker in markers)
    return f"/(.|\\n)*/ & ~/(.|\\n)*({excluded})(.|\\n)*/"


def _regex_literal(text: str) -> str:
    return "".join(f"\\{char}" if char in ".^$*+?()[]{}|\\/" else char for char in text)


def _custom_input_rule(index: int, tool: Tool) -> list[str]:
    """The text of a custom tool's call: its own grammar, or any text that does not close the call."""
    name = f"input_{index}"
    if tool.grammar is None:
        return [f"{name.upper()}: {_text_without(['</tool_call>'])}", f"{name}: {name.upper()}"]
    if tool.grammar.syntax == "regex":
        return [f"{name}: /{llguidance.regex_to_lark(tool.grammar.definition)}/"]
    return [f"{name}: %lark {{\n{tool.grammar.definition}\n}}"]


def _call_rule(index: int, tool: Tool) -> list[str]:
    if tool.kind == CUSTOM_TOOL:
        header = json.dumps(json.dumps({"name": tool.name}, ensure_ascii=False) + "\n")
        return [f"call_{index}: {header} input_{index}", *_custom_input_rule(index, tool)]
    return [f"call_{index}: %json {json.dumps(_with_style(_call_schema(tool)))}"]


def _call_rules(constraint: OutputConstraint) -> list[str]:
    """Lark rules for one call (a named tool) or up to MAX_PARALLEL_CALLS, each in the Hermes form."""
    tools = [tool for tool in constraint.tools if constraint.forced_function in (None, tool.name)]
    rules = [rule for index, tool in enumerate(tools) for rule in _call_rule(index, tool)]
    rules.append("call_body: " + " | ".join(f"call_{index}" for index in range(len(tools))))
    rules.append('call: "<tool_call>\\n" call_body "\\n</tool_call>"')
    several = constraint.parallel_calls and constraint.forced_function is None
    # A newline may end the calls too: models often write one before end-of-sequence, and forcing
    # another call after it made SmolLM2 call on until the token limit.
    rules.append(f'calls: call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}} "\\n"?' if several else 'calls: call "\\n"?')
    return rules


def check_tool(tool: Tool, param: str) -> None:
    """GrammarError naming ``param`` when a tool's schema or grammar cannot be compiled."""
    if tool.kind != CUSTOM_TOOL:
        check_schema(tool.parameters_schema(), param)
        return
    if tool.grammar is None:
        return
    try:
        lark = "start: input_0\n" + "\n".join(_custom_input_rule(0, tool))
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(lark))
    except (ValueError, TypeError) as problem:
        error = str(problem)
    if error:
        raise GrammarError(param, f"invalid {tool.grammar.syntax} grammar in {param}: {error}")


def build_grammar(
    constraint: OutputConstraint,
    tool_params: Sequence[str] = (),
    schema_param: str = "response_format.json_schema.schema",
) -> str | None:
    """The llguidance grammar for ``constraint`` (None when generation stays free); GrammarError when invalid.

    ``tool_params`` name each tool's field in the request, for error messages.
    """
    for index, tool in enumerate(constraint.tools):
        check_tool(tool, tool_params[index] if index < len(tool_params) else f"tools[{index}].function.parameters")
    if constraint.json_schema is not None:
        check_schema(constraint.json_schema, schema_param)
    if not constraint.constrained:
        return None
    if constraint.tool_mode == "none" and constraint.json_schema is None:
        return f"start: FREE_TEXT\nFREE_TEXT: {_text_without(constraint.forbidden_markers)}"
    rules: list[str] = []
    alternatives: list[str] = []
    if constraint.tools and constraint.tool_mode != "none":
        rules += _call_rules(constraint)
        alternatives.append("calls")
    if constraint.json_schema is not None and constraint.tool_mode != "required":
        rules.append(f"json_output: %json {json.dumps(_with_style(constraint.json_schema))}")
        alternatives.append("json_output")
    lark = "start: " + " | ".join(alternatives) + "\n" + "\n".join(rules)
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError("tools" if constraint.tools else "response_format", f"could not build the grammar: {error}")
    return grammar
