"""Tool calls out of model output: recorded outputs of several model families, whole and streamed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_server.chat.call_formats import (
    HARMONY,
    HERMES,
    LLAMA3_JSON,
    ToolCallFormat,
    detect_tool_call_format,
    format_named,
)
from mlx_server.chat.call_pieces import CallArgumentsPiece, CallPiece, CallStartPiece, ContentPiece
from mlx_server.chat.tool_parsing import ToolCallExtractor, parse_tool_calls

NAMES = frozenset({"get_weather", "search_web", "write_file"})
MISTRAL = format_named("mistral")
QWEN3_CODER = format_named("qwen3_coder")
PYTHONIC = format_named("pythonic")
GLM = format_named("glm47")
KIMI = format_named("kimi_k2")
GEMMA4 = format_named("gemma4")

# (family, format, recorded output, expected content, expected [(name, arguments)])
RECORDED: list[tuple[str, ToolCallFormat, str, str, list[tuple[str, dict[str, Any]]]]] = [
    (
        "Qwen 2.5",
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "Qwen 2.5, two calls after some text",
        HERMES,
        "Let me look both up.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call>',
        "Let me look both up.\n",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})],
    ),
    (
        "Hermes 2 Pro, arguments first and braces inside strings",
        HERMES,
        '<tool_call>\n{"arguments": {"query": "json {\\"a\\": [1, 2]} }", "max_results": 3}, "name": "search_web"}\n'
        "</tool_call>",
        "",
        [("search_web", {"query": 'json {"a": [1, 2]} }', "max_results": 3})],
    ),
    (
        "Hermes, arguments as a JSON string",
        HERMES,
        '<tool_call>{"name": "search_web", "arguments": "{\\"query\\": \\"mlx\\"}"}</tool_call>',
        "",
        [("search_web", {"query": "mlx"})],
    ),
    (
        "Llama 3.1, a bare JSON call",
        LLAMA3_JSON,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        "",
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
    ),
    (
        "Llama 3.1, python tag and two calls",
        LLAMA3_JSON,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "search_web", "parameters": {"query": "Paris events"}}',
        "",
        [("get_weather", {"city": "Paris"}), ("search_web", {"query": "Paris events"})],
    ),
    (
        "Llama 3.1, prose that starts like JSON is content",
        LLAMA3_JSON,
        "{Paris} is the capital of France.",
        "{Paris} is the capital of France.",
        [],
    ),
    (
        "Mistral v3, a JSON list",
        MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "search_web", "arguments": {"query": "louvre"}}]',
        "",
        [("get_weather", {"city": "Paris"}), ("search_web", {"query": "louvre"})],
    ),
    (
        "Mistral Small 3.2, name[ARGS]",
        MISTRAL,
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        "Checking.",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "Qwen3-Coder, XML parameters",
        QWEN3_CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "LFM2, pythonic",
        PYTHONIC,
        '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "GLM 4.5, arg_key and arg_value",
        GLM,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "Kimi K2, a tool-call section",
        KIMI,
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "Gemma 4, quoted strings",
        GEMMA4,
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "gpt-oss, harmony commentary",
        HARMONY,
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "Hermes fallback for a model whose own format is Mistral's",
        MISTRAL,
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
]

# (case, output, content): call markup that is not a valid call is dropped, never returned as content.
NOT_CALLS = [
    (
        "truncated mid-arguments",
        'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
        "Checking.",
    ),
    ("broken JSON", '<tool_call>{"name": "get_weather", "arguments": {city: Paris}}</tool_call>', ""),
    ("a function that was not offered", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> Done.', " Done."),
    ("arguments that are not an object", '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', ""),
    ("no name", '<tool_call>{"arguments": {}}</tool_call>', ""),
    ("plain prose", "The weather in Paris is mild.", "The weather in Paris is mild."),
]


def _calls(text: str, call_format: ToolCallFormat, parallel: bool = True) -> tuple[str, list[tuple[str, Any]]]:
    content, calls = parse_tool_calls(text, call_format, NAMES, parallel)
    return content, [(call.name, json.loads(call.arguments)) for call in calls]


@pytest.mark.parametrize(
    ("call_format", "output", "content", "expected"),
    [case[1:] for case in RECORDED],
    ids=[case[0] for case in RECORDED],
)
def test_recorded_outputs(
    call_format: ToolCallFormat, output: str, content: str, expected: list[tuple[str, dict[str, Any]]]
) -> None:
    assert _calls(output, call_format) == (content, expected)


@pytest.mark.parametrize(("output", "content"), [case[1:] for case in NOT_CALLS], ids=[case[0] for case in NOT_CALLS])
def test_markup_that_does_not_parse_is_dropped_not_content(output: str, content: str) -> None:
    assert _calls(output, HERMES) == (content, [])


def test_a_call_cut_short_whose_arguments_parse_is_closed() -> None:
    """A call cut by the token limit after its JSON was complete is still a call."""
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert _calls(output, HERMES) == ("", [("get_weather", {"city": "Paris"})])


def test_calls_are_dropped_when_not_to_be_emitted() -> None:
    """Under tool_choice none, call markup is neither content nor a call."""
    extractor = ToolCallExtractor(HERMES, NAMES, emit=False)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    pieces = extractor.feed(f"Sure. {call} Bye.") + extractor.finish()
    assert [piece.text for piece in pieces if isinstance(piece, ContentPiece)] == ["Sure. ", " Bye."]
    assert extractor.calls == []


def test_a_custom_tool_call_carries_its_text() -> None:
    """A custom tool (free text, not JSON) is written as a name header, then its text."""
    tools = {"apply_patch": "custom", "get_weather": "function"}
    output = '<tool_call>\n{"name": "apply_patch"}\n*** Begin Patch\n{not json}\n*** End Patch\n</tool_call>'
    content, calls = parse_tool_calls(output, HERMES, tools)
    assert content == ""
    assert [(call.name, call.kind, call.arguments) for call in calls] == [
        ("apply_patch", "custom", "*** Begin Patch\n{not json}\n*** End Patch")
    ]


def test_every_call_gets_a_fresh_id() -> None:
    output = RECORDED[1][2]
    first = parse_tool_calls(output, HERMES, NAMES)[1]
    second = parse_tool_calls(output, HERMES, NAMES)[1]
    ids = [call.id for call in first + second]
    assert len(set(ids)) == 4 and all(call_id.startswith("call_") for call_id in ids)


def test_one_call_when_not_parallel() -> None:
    assert _calls(RECORDED[1][2], HERMES, parallel=False)[1] == [("get_weather", {"city": "Paris"})]


def test_a_repeated_call_is_dropped() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert _calls(f"{call}\n{call}\n", HERMES) == ("", [("get_weather", {"city": "Paris"})])


class TestMarkersInsideArguments:
    """A call ends where its format ends: a file an agent writes may contain the closing marker's text."""

    CASES = (
        (HERMES, '<tool_call>\n{"name": "write_file", "arguments": {"text": "a</tool_call>b"}}\n</tool_call> Done.'),
        (
            QWEN3_CODER,
            "<tool_call>\n<function=write_file>\n<parameter=text>\na</tool_call>b\n</parameter>\n</function>\n"
            "</tool_call> Done.",
        ),
    )

    @pytest.mark.parametrize(("call_format", "output"), CASES, ids=["hermes", "qwen3_coder"])
    @pytest.mark.parametrize("chunk", [1, 3, 1000], ids=["by character", "by three", "whole"])
    def test_the_closing_marker_inside_an_argument_is_part_of_it(
        self, call_format: ToolCallFormat, output: str, chunk: int
    ) -> None:
        extractor = ToolCallExtractor(call_format, NAMES, parallel=False)
        pieces = [
            piece for index in range(0, len(output), chunk) for piece in extractor.feed(output[index : index + chunk])
        ]
        pieces += extractor.finish()
        calls = [json.loads(piece.call.arguments) for piece in pieces if isinstance(piece, CallPiece)]
        assert calls == [{"text": "a</tool_call>b"}]
        assert "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece)) == " Done."


class TestRepeats:
    """A small model allowed several calls tends to repeat its first until the token limit."""

    FIRST = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'

    def test_a_call_that_starts_over_is_recognized_at_its_first_argument(self) -> None:
        """The same function with the same first argument: recognized before the repeat is written out."""
        extractor = ToolCallExtractor(HERMES, {"get_weather"})
        extractor.feed(self.FIRST + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"')
        assert extractor.repeated and len(extractor.calls) == 1

    def test_a_call_with_another_first_argument_goes_on(self) -> None:
        """Parallel calls that differ in their first argument are not repeats."""
        extractor = ToolCallExtractor(HERMES, {"get_weather"})
        extractor.feed(self.FIRST + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "days": 2}}')
        assert not extractor.repeated

    @pytest.mark.parametrize(
        ("first", "second"),
        [('"city": "Paris"', '"city": "Parisian"'), ('"days": 2', '"days": 23')],
        ids=["string", "number"],
    )
    def test_a_first_argument_that_only_begins_alike_is_not_a_repeat(self, first: str, second: str) -> None:
        """The value must end where the earlier one did: "Paris" then "Parisian", 2 then 23."""
        extractor = ToolCallExtractor(HERMES, {"get_weather"})
        extractor.feed(f'<tool_call>\n{{"name": "get_weather", "arguments": {{{first}}}}}\n</tool_call>\n')
        extractor.feed(f'<tool_call>\n{{"name": "get_weather", "arguments": {{{second}')
        assert not extractor.repeated
        extractor.feed("}}")
        assert not extractor.repeated


def test_whitespace_between_calls_is_not_content_but_prose_keeps_its_spaces() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert _calls(f"\n{call}\n\n", HERMES)[0] == ""
    assert _calls("Hello,\n\n  world\n", HERMES) == ("Hello,\n\n  world\n", [])


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(RECORDED + [(name, HERMES, text, content, []) for name, text, content in NOT_CALLS]),
    data=st.data(),
)
def test_streaming_in_any_chunks_gives_the_same_result(
    case: tuple[str, ToolCallFormat, str, str, list[Any]], data: st.DataObject
) -> None:
    """However the text is split into deltas, the streamed content and calls equal the whole parse."""
    _, call_format, output, content, expected = case
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(output) - 1)), max_size=12)))
    chunks = [output[start:end] for start, end in zip([0, *cuts], [*cuts, len(output)])]
    extractor = ToolCallExtractor(call_format, NAMES)
    pieces = [piece for chunk in chunks for piece in extractor.feed(chunk)] + extractor.finish()
    streamed = "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece))
    calls = [(piece.call.name, json.loads(piece.call.arguments)) for piece in pieces if isinstance(piece, CallPiece)]
    assert (streamed, calls) == (content, expected)


def test_content_streams_before_the_call_ends() -> None:
    """Text before a call goes out as it comes; only a possible marker start is held back."""
    extractor = ToolCallExtractor(HERMES, NAMES)
    assert extractor.feed("Sure, ") == [ContentPiece("Sure, ")]
    assert extractor.feed("<tool") == []
    started = extractor.feed('_call>{"name": "get_weather", "arguments": {}}')
    start, _arguments = started
    assert isinstance(start, CallStartPiece) and isinstance(_arguments, CallArgumentsPiece)
    (ended,) = extractor.feed("</tool_call>")
    assert isinstance(ended, CallPiece) and ended.streamed and ended.call.id == start.id


@dataclass
class TemplateOnly:
    """What format detection reads from a tokenizer: its chat template and vocabulary."""

    chat_template: str
    vocab: dict[str, int] = field(default_factory=dict)

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def __hash__(self) -> int:
        return hash(self.chat_template)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "hermes"),
        ("{%- if tools %}<tool_call>\n{{ tool_call.name }}</tool_call>{% endif %}", "hermes"),
        ("{{- '[TOOL_CALLS]' + tool_calls|tojson }}", "mistral"),
        ("{{- '<|python_tag|>' }}{{- '\"parameters\": ' }}", "llama3_json"),
        ("<tool_call>\n<function={{ tool_call.name }}>", "qwen3_coder"),
    ],
    ids=["no tools", "Qwen 2.5", "Mistral", "Llama 3.1", "Qwen3-Coder"],
)
def test_format_follows_the_chat_template(template: str, expected: str) -> None:
    assert detect_tool_call_format(TemplateOnly(template)).name == expected


# -- calls streamed as they are written ------------------------------------------------------------------------

WRITTEN = 'def scale(value):\n    return value * 2  # "twice" \\ and a tab\there, é, 😀\n' * 6
WRITE_SCHEMAS = [
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}},
]  # fmt: skip
WRITE_ARGUMENTS = {"path": "scale.py", "content": WRITTEN}
# (family, format, the output of a long Write call, in the format's own way)
LONG_CALLS = [
    ("Hermes", HERMES,
     f"<tool_call>\n{json.dumps({'name': 'write_file', 'arguments': WRITE_ARGUMENTS})}\n</tool_call>"),
    ("Llama 3.1", LLAMA3_JSON, f"<|python_tag|>{json.dumps({'name': 'write_file', 'parameters': WRITE_ARGUMENTS})}"),
    ("Mistral list", MISTRAL, f"[TOOL_CALLS]{json.dumps([{'name': 'write_file', 'arguments': WRITE_ARGUMENTS}])}"),
    ("Mistral name[ARGS]", MISTRAL, f"[TOOL_CALLS]write_file[ARGS]{json.dumps(WRITE_ARGUMENTS)}"),
    ("harmony", HARMONY, "<|channel|>commentary to=functions.write_file <|constrain|>json<|message|>"
     + json.dumps(WRITE_ARGUMENTS)),
    ("Qwen3-Coder", QWEN3_CODER, "<tool_call>\n<function=write_file>\n<parameter=path>\nscale.py\n</parameter>\n"
     f"<parameter=content>\n{WRITTEN}\n</parameter>\n</function>\n</tool_call>"),
    ("GLM", GLM, f"<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>scale.py</arg_value>\n"
     f"<arg_key>content</arg_key>\n<arg_value>{WRITTEN}</arg_value>\n</tool_call>"),
    ("pythonic", PYTHONIC, f"<|tool_call_start|>[write_file(path='scale.py', content={WRITTEN!r})]<|tool_call_end|>"),
]  # fmt: skip


@dataclass
class Streamed:
    """What the pieces of one output said: content, and per call index its start, argument deltas and end."""

    content: str = ""
    starts: dict[int, CallStartPiece] = field(default_factory=dict)
    deltas: dict[int, list[str]] = field(default_factory=dict)
    calls: dict[int, CallPiece] = field(default_factory=dict)
    abandoned: list[int] = field(default_factory=list)


def streamed(extractor: ToolCallExtractor, chunks: list[str]) -> Streamed:
    seen = Streamed()
    for piece in [piece for chunk in chunks for piece in extractor.feed(chunk)] + extractor.finish():
        if isinstance(piece, ContentPiece):
            seen.content += piece.text
        elif isinstance(piece, CallStartPiece):
            assert piece.index not in seen.starts and piece.index not in seen.deltas, "a start comes first, once"
            seen.starts[piece.index] = piece
        elif isinstance(piece, CallArgumentsPiece):
            assert piece.index in seen.starts and piece.index not in seen.calls
            seen.deltas.setdefault(piece.index, []).append(piece.text)
        elif isinstance(piece, CallPiece):
            seen.calls[piece.index] = piece
        else:
            seen.abandoned.append(piece.index)
    return seen


def cut(output: str, cuts: list[int]) -> list[str]:
    return [output[start:end] for start, end in zip([0, *sorted(set(cuts))], [*sorted(set(cuts)), len(output)])]


class TestStreamedCalls:
    def test_the_split_that_once_lost_a_newline(self) -> None:
        """Qwen 2.5's "two calls after some text", cut at {1, 2, 3, 20}: the newline before the calls is content."""
        _, call_format, output, content, _ = RECORDED[1]
        seen = streamed(ToolCallExtractor(call_format, NAMES), cut(output, [1, 2, 3, 20]))
        assert seen.content == content == "Let me look both up.\n"

    @settings(max_examples=120)
    @given(case=st.sampled_from(RECORDED + [(name, fmt, text, "", []) for name, fmt, text in LONG_CALLS]),
           data=st.data())  # fmt: skip
    def test_deltas_add_up_to_the_final_arguments_however_the_text_is_cut(
        self, case: tuple[str, ToolCallFormat, str, str, list[Any]], data: st.DataObject
    ) -> None:
        _, call_format, output, _, _ = case
        cuts = data.draw(st.lists(st.integers(1, max(1, len(output) - 1)), max_size=40))
        seen = streamed(ToolCallExtractor(call_format, NAMES, schemas=WRITE_SCHEMAS), cut(output, cuts))
        assert not seen.abandoned
        for index, start in seen.starts.items():
            call = seen.calls[index]
            assert call.streamed and call.call.id == start.id and call.call.name == start.name
            assert "".join(seen.deltas.get(index, [])) == call.call.arguments
            json.loads(call.call.arguments)

    @pytest.mark.parametrize(
        ("family", "call_format", "output"), LONG_CALLS, ids=[family for family, _, _ in LONG_CALLS]
    )
    def test_a_long_call_streams_its_arguments_as_they_are_written(
        self, family: str, call_format: ToolCallFormat, output: str
    ) -> None:
        """A Write of a file, fed a few characters at a time (as tokens come): deltas all along, not one at the end."""
        extractor = ToolCallExtractor(call_format, NAMES, schemas=WRITE_SCHEMAS)
        seen = streamed(extractor, cut(output, list(range(4, len(output), 4))))
        (call,) = seen.calls.values()
        (whole,) = parse_tool_calls(output, call_format, NAMES, schemas=WRITE_SCHEMAS)[1]
        assert call.streamed and call.call.arguments == whole.arguments
        assert len(seen.deltas[call.index]) >= len(WRITTEN) // 40, "at least one delta per few tokens"
        assert "".join(seen.deltas[call.index]) == call.call.arguments

    def test_a_call_cut_short_is_abandoned_and_not_among_the_calls(self) -> None:
        extractor = ToolCallExtractor(HERMES, NAMES)
        seen = streamed(extractor, ['Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'])
        assert seen.starts and seen.abandoned == [0] and not seen.calls and not extractor.calls

    def test_a_repeat_of_an_earlier_call_is_never_streamed(self) -> None:
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        extractor = ToolCallExtractor(HERMES, NAMES)
        seen = streamed(extractor, cut(call + call, list(range(3, 2 * len(call), 3))))
        assert list(seen.starts) == [0] and not seen.abandoned and extractor.repeated

    @pytest.mark.parametrize(("parallel", "emit"), [(False, True), (True, False)], ids=["not parallel", "none"])
    def test_calls_that_would_not_be_kept_are_never_streamed(self, parallel: bool, emit: bool) -> None:
        output = RECORDED[1][2]
        extractor = ToolCallExtractor(HERMES, NAMES, parallel=parallel, emit=emit)
        seen = streamed(extractor, cut(output, list(range(2, len(output), 2))))
        assert len(seen.starts) == (1 if emit else 0) and not seen.abandoned
