"""The grammar a request's whole output follows (llguidance's Lark dialect), in the model's own call format.

* ``tool_choice`` ``required`` or a named function: the output is calls
  (several when parallel calls are allowed), after the model's reasoning if
  it reasons.
* ``auto`` with tools: a lazy grammar.  The output is free (any token, the
  reasoning markers included) until the model opens a call with its start
  token or marker; from there the call must be valid, then the output is
  free again (or ends, when parallel calls are off).  So every call the
  model starts parses and validates.
* ``none`` with tools: free output that cannot open a call.
* a JSON ``response_format``: the output is that JSON (or, with ``auto``
  and tools, either calls or the JSON).

gpt-oss writes everything in harmony channels; its grammars keep the
analysis channel (its reasoning) free and constrain the call or final answer
after it.  Calls are written by ``call_grammars`` in each family's format;
object schemas that leave ``additionalProperties`` open are closed for
generation (the output still validates against the schema as given), and JSON
is written compactly as models are trained to write it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance

from mlx_server.chat.call_formats import HARMONY, HERMES, ToolCallFormat
from mlx_server.chat.call_grammars import (
    MAX_PARALLEL_CALLS,
    GrammarWriter,
    custom_input_rules,
    styled_schema,
    text_without,
)
from mlx_server.vocabulary import CUSTOM_TOOL, GrammarError, Tool, ToolMode

__all__ = ["GrammarVerdicts", "OutputConstraint", "ReasoningMarkers", "build_grammar", "check_schema", "check_tool"]

#: Schemas and grammars whose verdict a model's chat service remembers.
VERDICTS_REMEMBERED = 512


@dataclass(frozen=True)
class ReasoningMarkers:
    """How the model marks its thinking (``<think>``, ``</think>``), and whether its prompt opened it already."""

    start: str
    end: str
    starts_inside: bool = False


@dataclass(frozen=True)
class OutputConstraint:
    """What a request's output must be (see the module's docstring).

    ``forbidden_markers`` is text that must never appear (call openings under
    ``none``); ``eos`` are the tokens that end the output.
    """

    tools: Sequence[Tool] = ()
    tool_mode: ToolMode = "none"
    forced_function: str | None = None
    parallel_calls: bool = True
    json_schema: dict[str, Any] | None = None
    call_format: ToolCallFormat = HERMES
    reasoning: ReasoningMarkers | None = None
    forbidden_markers: tuple[str, ...] = ()
    eos: tuple[int, ...] = ()
    reasoning_budget: int | None = None  # tokens of thinking before a forced answer; None: unbounded
    thinking_budget: int | None = None  # tokens of thinking the request allows, whatever follows; None: unbounded

    @property
    def constrained(self) -> bool:
        calls = bool(self.tools) and self.tool_mode in ("required", "auto")
        return calls or self.json_schema is not None or bool(self.forbidden_markers) or self.bounds_thinking

    @property
    def bounds_thinking(self) -> bool:
        """A thinking budget, on a model whose thinking a grammar can close (markers, or harmony's channels)."""
        return self.thinking_budget is not None and (self.reasoning is not None or self.call_format is HARMONY)

    @property
    def forced(self) -> bool:
        """The output must be calls or JSON: thinking before it gets at most ``reasoning_budget``."""
        return self.tool_mode == "required" or self.json_schema is not None


class GrammarVerdicts:
    """llguidance's verdicts on the schemas and grammars clients send, by their text (empty: valid).

    An agent sends the same tools every turn; checking them once saves
    compiling each schema on every request.  One per chat service, so
    nothing is shared between models by accident (one lock, held briefly).
    """

    def __init__(self, remembered: int = VERDICTS_REMEMBERED) -> None:
        self._verdicts: OrderedDict[str, str] = OrderedDict()
        self._remembered = remembered
        self._lock = threading.Lock()

    def verdict(self, kind: str, definition: str, compile_grammar: Any) -> str:
        key = hashlib.sha256(f"{kind}\0{definition}".encode()).hexdigest()
        with self._lock:
            verdict = self._verdicts.get(key)
        if verdict is None:
            try:
                verdict = llguidance.LLMatcher.validate_grammar(compile_grammar())
            except (ValueError, TypeError) as problem:
                verdict = str(problem)
            with self._lock:
                self._verdicts[key] = verdict
                while len(self._verdicts) > self._remembered:
                    self._verdicts.popitem(last=False)
        return verdict


def check_schema(schema: dict[str, Any], param: str, verdicts: GrammarVerdicts | None = None) -> None:
    """GrammarError naming ``param`` when llguidance cannot compile ``schema``."""
    styled = styled_schema(schema)
    text = json.dumps(schema, sort_keys=True, default=str)
    error = (verdicts or GrammarVerdicts(0)).verdict(
        "schema", text, lambda: llguidance.LLMatcher.grammar_from_json_schema(styled)
    )
    if error:
        raise GrammarError(param, f"invalid JSON schema in {param}: {error}")


def check_tool(tool: Tool, param: str, verdicts: GrammarVerdicts | None = None) -> None:
    """GrammarError naming ``param`` when a tool's schema or grammar cannot be compiled."""
    if tool.kind != CUSTOM_TOOL:
        check_schema(tool.parameters_schema(), param, verdicts)
        return
    if tool.grammar is None:
        return
    lark = "start: input_0\n" + "\n".join(custom_input_rules(0, tool))
    error = (verdicts or GrammarVerdicts(0)).verdict("lark", lark, lambda: llguidance.LLMatcher.grammar_from_lark(lark))
    if error:
        raise GrammarError(param, f"invalid {tool.grammar.syntax} grammar in {param}: {error}")


def build_grammar(
    constraint: OutputConstraint,
    writer: GrammarWriter,
    tool_params: Sequence[str] = (),
    schema_param: str = "response_format.json_schema.schema",
    verdicts: GrammarVerdicts | None = None,
) -> str | None:
    """The llguidance grammar for ``constraint`` (None when generation stays free); GrammarError when invalid.

    ``tool_params`` name each tool's field in the request, for error messages;
    ``verdicts`` remembers which tools and schemas were already found valid.
    """
    for index, tool in enumerate(constraint.tools):
        param = tool_params[index] if index < len(tool_params) else f"tools[{index}].function.parameters"
        check_tool(tool, param, verdicts)
    if constraint.json_schema is not None:
        check_schema(constraint.json_schema, schema_param, verdicts)
    if not constraint.constrained:
        return None
    builder = _GrammarBuilder(constraint, writer)
    lark = builder.harmony() if constraint.call_format is HARMONY else builder.lark()
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError("tools" if constraint.tools else "response_format", f"could not build the grammar: {error}")
    return grammar


class _GrammarBuilder:
    """Writes one request's grammar (one use)."""

    def __init__(self, constraint: OutputConstraint, writer: GrammarWriter) -> None:
        self.constraint = constraint
        self.writer = writer
        self.format = constraint.call_format
        self.rules: list[str] = []

    @property
    def calling(self) -> bool:
        return bool(self.constraint.tools) and self.constraint.tool_mode in ("required", "auto")

    def lark(self) -> str:
        constraint = self.constraint
        thinking = self._reasoning() if constraint.bounds_thinking else ""
        if not self.calling and constraint.json_schema is None:
            markers = (self.format.start, self.format.end, HERMES.start, HERMES.end) if constraint.tools else ()
            reopening = (constraint.reasoning.start,) if thinking and constraint.reasoning else ()
            free = self._free((*constraint.forbidden_markers, *reopening), markers, name="free")
            return self._finish(f"{thinking} {free}")
        if constraint.tool_mode == "auto" and constraint.json_schema is None:
            return self._finish(f"{thinking} {self._lazy_calls()}")
        alternatives = []
        if self.calling:
            alternatives.append(self._calls(opened=False))
        if constraint.json_schema is not None and constraint.tool_mode != "required":
            self.rules.append(f"json_output: {self.writer.json(constraint.json_schema)}")
            alternatives.append("json_output")
        body = alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"
        return self._finish(f"{self._reasoning()} {body}")

    def _finish(self, start: str) -> str:
        return "\n".join([f"start: {start}", *self.rules])

    # -- pieces ------------------------------------------------------------------------------

    def _tools(self) -> list[Tool]:
        forced = self.constraint.forced_function
        return [tool for tool in self.constraint.tools if forced in (None, tool.name)]

    def _call(self, opened: bool) -> str:
        """One call of any offered tool, as a rule name (written once)."""
        suffix = "opened" if opened else "any"
        if any(rule.startswith(f"call_{suffix}:") for rule in self.rules):
            return f"call_{suffix}"
        names = []
        for index, tool in enumerate(self._tools()):
            number = index if not opened else 1000 + index
            self.rules += self.format.call(self.writer, number, tool, opened)
            names.append(f"call_{number}")
        self.rules.append(f"call_{suffix}: " + " | ".join(names))
        return f"call_{suffix}"

    def _calls(self, opened: bool) -> str:
        """One or several calls, in the format's outer markers and list; ``opened``: its opening is written."""
        fmt, writer = self.format, self.writer
        first = self._call(opened and not fmt.outer[0])
        several = self.constraint.parallel_calls and self.constraint.forced_function is None and fmt.parallel
        rest = self._call(False) if several else ""
        separator = json.dumps(fmt.separator) if fmt.separator else ""
        sequence = f"{first} ({separator} {rest}){{0,{MAX_PARALLEL_CALLS - 1}}}" if several else first
        parts = [
            writer.mark(fmt.outer[0]) if fmt.outer[0] and not opened else "",
            json.dumps(fmt.list_start) if fmt.list_start else "",
            sequence,
            json.dumps(fmt.list_end) if fmt.list_end else "",
            writer.mark(fmt.outer[1]) if fmt.outer[1] else "",
        ]
        # A newline may end the calls: models often write one before end-of-sequence.
        trailing = ' "\\n"?' if fmt.separator == "\n" else ""
        return " ".join(part for part in parts if part) + trailing

    def _reasoning(self) -> str:
        """The model's thinking before a forced answer: optional, or required when the prompt opened it."""
        reasoning = self.constraint.reasoning
        if reasoning is None:
            return ""
        end = self.writer.mark(reasoning.end)
        thought = self._thought((reasoning.end,))
        space = self.writer.lexeme("/[ \\t\\r\\n]{0,8}/", self.rules)  # bounded: a random model may loop on it
        if reasoning.starts_inside:
            return f"{thought} {end} {space}"
        return f"({self.writer.mark(reasoning.start)} {thought} {end} {space})?"

    def _thought(self, ends: Sequence[str]) -> str:
        """Reasoning within its budget when there is one: the request's, and before a forced answer at most
        ``reasoning_budget`` tokens, so the answer comes.

        A bounded thought is text only (llguidance bounds terminals, not
        special tokens), which is what thinking is.
        """
        budget = self._thought_budget()
        if budget is None:
            return self._free(excluded_texts=ends, excluded_tokens=ends, name="thought")
        texts = [marker for marker in ends if not self.writer.is_token(marker)]
        return self.writer.lexeme(text_without(texts), self.rules, max_tokens=max(budget, 1))

    def _thought_budget(self) -> int | None:
        constraint = self.constraint
        budgets = [constraint.thinking_budget, constraint.reasoning_budget if constraint.forced else None]
        given = [budget for budget in budgets if budget is not None]
        return min(given) if given else None

    def _free(self, excluded_texts: Sequence[str] = (), excluded_tokens: Sequence[str] = (), name: str = "") -> str:
        """Any output without these markers: text, and every special token but them and end-of-sequence.

        A marker that is one special token is excluded by id; one that is text, by the text lexeme.
        """
        writer = self.writer
        texts = [marker for marker in excluded_texts if not writer.is_token(marker)]
        blocked = {writer.token_id(marker) for marker in (*excluded_texts, *excluded_tokens)} - {None}
        blocked |= set(self.constraint.eos)
        text = writer.lexeme(text_without(texts, non_empty=True), self.rules)
        specials = sorted(token for token in writer.special_ids() if token not in blocked)
        rule = f"{name or 'free'}_{len(self.rules)}"
        alternatives = [text] + ([f"<[{','.join(map(str, specials))}]>"] if specials else [])
        self.rules.append(f"{rule}: ({' | '.join(alternatives)})*")
        return rule

    def _lazy_calls(self) -> str:
        """Free output, calls wherever the model opens one (``auto``)."""
        fmt, writer = self.format, self.writer
        if fmt.bare_json:
            return self._bare_json_or_text()
        trigger = fmt.outer[0] or fmt.start
        free = self._free(excluded_texts=(trigger,), name="free")
        once = not self.constraint.parallel_calls  # then the output ends with its one call
        if writer.is_token(trigger):
            calls = self._calls(opened=False)
            return f"{free} ({calls})?" if once else f"{free} ({calls} {free})*"
        # A text trigger: a lazy rule that ends where the marker is written (llguidance's lazy lexemes),
        # then the rest of the call.
        anything = writer.lexeme("/(.|\\n)*/", self.rules)
        opened = f"opened_{len(self.rules)}"
        self.rules.append(f"{opened}[lazy]: {anything} {json.dumps(trigger)}")
        calls = self._calls(opened=True)
        return f"({opened} {calls} | {free})" if once else f"({opened} {calls})* {free}?"

    def _bare_json_or_text(self) -> str:
        """Llama 3.1 under ``auto``: a bare JSON call (after ``<|python_tag|>`` if it writes one), or text."""
        text = self.writer.lexeme("/[^{\\[ \\t\\r\\n](.|\\n)*/", self.rules)
        tag = self.format.start
        opening = f"{self.writer.mark(tag)}? " if tag and self.writer.is_token(tag) else ""
        return f"({opening}{self._calls(opened=False)} | {text})?"

    # -- gpt-oss -------------------------------------------------------------------------------

    def harmony(self) -> str:
        """Harmony: reasoning on the analysis channel, then a call on commentary or the answer on final."""
        writer, constraint = self.writer, self.constraint
        channel, message, end, start = (writer.mark(marker) for marker in
                                        ("<|channel|>", "<|message|>", "<|end|>", "<|start|>"))  # fmt: skip
        if self._thought_budget() is not None:
            analysis_text, analyses = self._thought(("<|end|>",)), "analysis?"
        else:
            analysis_text, analyses = self._free(excluded_tokens=("<|end|>",), name="analysis"), "analysis*"
        self.rules.append(f'analysis: {channel} "analysis" {message} {analysis_text} {end} {start} "assistant"')
        answer_text = self._free(excluded_tokens=("<|end|>",), name="answer")
        endings = []
        if self.calling:
            endings.append(self._call(opened=False))
        if constraint.json_schema is not None and constraint.tool_mode != "required":
            endings.append(f'{channel} "final" {message} {writer.json(constraint.json_schema)}')
        elif constraint.tool_mode != "required":
            endings.append(f'{channel} "final" {message} {answer_text}')
        return self._finish(f"{analyses} ({' | '.join(endings)})")
