"""Generated text -> reasoning, content and calls: the output rules every dialect shares."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_server.chat.call_formats import HERMES
from mlx_server.chat.call_pieces import CallPiece, ContentPiece
from mlx_server.chat.output import OutputParser, ReasoningPiece, ReasoningSyntax
from mlx_server.chat.tool_parsing import ToolCalling

THINK = ReasoningSyntax("<think>", "</think>")
TOOLS = ToolCalling(HERMES, (("get_weather", "function"),))
OUTPUT = (
    "<think>The user wants the weather.\nI should call the tool.</think>Let me check."
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


Parsed = tuple[str, str, list[tuple[str, Any]]]


def split(pieces: Sequence[object]) -> Parsed:
    reasoning = "".join(piece.text for piece in pieces if isinstance(piece, ReasoningPiece))
    content = "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece))
    calls = [(piece.call.name, json.loads(piece.call.arguments)) for piece in pieces if isinstance(piece, CallPiece)]
    return reasoning, content, calls


def parse(text: str, reasoning: ReasoningSyntax | None = THINK, tools: ToolCalling | None = TOOLS) -> Parsed:
    parser = OutputParser(reasoning, tools)
    return split(parser.feed(text) + parser.finish())


def test_thinking_content_and_a_call_are_separated() -> None:
    assert parse(OUTPUT) == (
        "The user wants the weather.\nI should call the tool.",
        "Let me check.",
        [("get_weather", {"city": "Paris"})],
    )


def test_output_that_starts_inside_a_thinking_block() -> None:
    """Templates that open <think> in the prompt: everything before </think> is reasoning."""
    syntax = ReasoningSyntax("<think>", "</think>", starts_inside=True)
    assert parse("Hmm, easy.</think>Paris.", syntax, None) == ("Hmm, easy.", "Paris.", [])


def test_the_whitespace_after_thinking_is_not_content() -> None:
    """Templates write "</think>\\n\\n" before the answer; a call after it leaves no blank content."""
    assert parse("<think>Plan.</think>\n\n  Paris.", THINK, None) == ("Plan.", "Paris.", [])
    assert parse(OUTPUT.replace("Let me check.", "\n \n"))[1] == ""


def test_a_model_without_thinking_markers_keeps_them_as_text() -> None:
    assert parse("<think>x</think>y", None, None) == ("", "<think>x</think>y", [])


def test_unfinished_thinking_is_still_reasoning() -> None:
    """Cut by the token limit inside the thinking block: the thinking so far is reasoning, nothing is content."""
    assert parse("<think>Let me thin", THINK, None) == ("Let me thin", "", [])


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_streaming_in_any_chunks_gives_the_same_result(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, len(OUTPUT) - 1), max_size=15)))
    chunks = [OUTPUT[start:end] for start, end in zip([0, *cuts], [*cuts, len(OUTPUT)])]
    parser = OutputParser(THINK, TOOLS)
    pieces = [piece for chunk in chunks for piece in parser.feed(chunk)] + parser.finish()
    assert split(pieces) == parse(OUTPUT)
