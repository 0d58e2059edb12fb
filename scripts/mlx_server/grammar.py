"""Grammar-constrained decoding with llguidance: forced tool calls and JSON output that always parse.

A request that must call a tool (``tool_choice`` ``required`` or a named
function) or must answer in JSON (``response_format``) gets a grammar.  At
every step llguidance computes which tokens keep the output inside it; the
rest get -inf before sampling, so the result parses and validates by
construction, and once the grammar is complete only end-of-sequence remains.

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

``llguidance.mlx`` applies the mask with a Metal kernel; on CPU the bitmask is
unpacked with numpy and applied with ``mx.where``, which works everywhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from mlx_server.chat.request import CUSTOM_TOOL, Tool

__all__ = ["GrammarError", "GrammarProcessor", "GrammarTokenizer", "OutputConstraint", "build_grammar"]

logger = logging.getLogger("mlx")

MAX_PARALLEL_CALLS = 8
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled; ``param`` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it; built once (about 0.3 s), at warm-up or on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._built: llguidance.LLTokenizer | None = None
        self.unavailable: str | None = None
        self._lock = threading.Lock()

    def get(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer; GrammarError when this model's tokenizer cannot be used."""
        with self._lock:
            if self._built is None and self.unavailable is None:
                hf_tokenizer = getattr(self._tokenizer, "_tokenizer", self._tokenizer)
                try:
                    eos = sorted(self._tokenizer.eos_token_ids)
                    self._built = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos)
                    logger.info("Constrained decoding ready (llguidance, %d tokens)", self._built.vocab_size)
                except (ValueError, TypeError, AttributeError) as error:
                    self.unavailable = (
                        f"constrained decoding needs a fast tokenizer; this model's cannot be used ({error})"
                    )
                    logger.warning("%s", self.unavailable)
            if self._built is None:
                raise GrammarError("response_format", self.unavailable or "constrained decoding is unavailable")
            return self._built


class GrammarProcessor:
    """An mlx-lm logits processor that masks every token the grammar does not allow next.

    mlx-lm calls it with the tokens so far and the next-token logits; from the
    second call on, the last token is the one sampled after the previous call,
    which the matcher consumes before computing the next mask.

    A small model allowed several calls tends to repeat its first one until
    the token limit.  A repeat is recognized as soon as a new call names the
    same function with the same first argument as an earlier call; the output
    then ends (only end-of-sequence is allowed), and the parser drops the
    unfinished repeat.  (Two genuine calls that differ only after their first
    argument are cut to one: the trade made for stopping early.)
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError("response_format", self.matcher.get_error())
        self._tokenizer = tokenizer
        self._text = ""
        self._started = False
        self._ended = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._ended:
            return logits
        if self._started:
            token = int(tokens[-1])
            if token in self._tokenizer.eos_tokens:
                # A batch computes one step past end-of-sequence; the matcher (which may have been cut
                # short by a repeat) must not see it.
                self._ended = True
                return logits
            self._text += self._tokenizer.decode_str([token])
            if not self.matcher.consume_token(token):
                logger.warning("Constrained decoding: the grammar refused a token (%s)", self.matcher.get_error())
        self._started = True
        if self.matcher.is_error():
            return logits
        if self._repeats_a_call():
            allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
            allowed[[eos for eos in self._tokenizer.eos_tokens if eos < allowed.size]] = True
        else:
            allowed = self._allowed_tokens(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, logits.dtype))

    def _allowed_tokens(self, vocabulary: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if bits.size < vocabulary:  # the model's output layer may be padded past the vocabulary
            bits = np.concatenate([bits, np.zeros(vocabulary - bits.size, dtype=np.uint8)])
        return bits[:vocabulary].astype(np.bool_)

    def _repeats_a_call(self) -> bool:
        if "</tool_call>" not in self._text:
            return False
        *earlier, current = self._text.split("<tool_call>")[1:] or [""]
        if "</tool_call>" in current:
            current = current.split("</tool_call>")[0]
        current = current.strip()
        return any(_is_recognized_repeat(previous.split("</tool_call>")[0].strip(), current) for previous in earlier)


def _is_recognized_repeat(previous: str, current: str) -> bool:
    """``current`` (a call being written) repeats ``previous`` through the end of its first argument."""
    try:
        call = json.loads(previous)
    except ValueError:
        return False
    arguments = call.get("arguments") if isinstance(call, dict) else None
    recognized_at = len(previous)
    if isinstance(arguments, dict) and arguments:
        key, value = next(iter(arguments.items()))
        first = (
            f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False, separators=(', ', ': '))}"
        )
        found = previous.find(first)
        if found >= 0:
            recognized_at = found + len(first)
    return len(current) >= recognized_at and current[:recognized_at] == previous[:recognized_at]
