"""Grammars for tool calls and JSON, in each family's own call format, with real vocabularies.

Decoding here is driven by chance instead of a model: at every step a token
is drawn among those the grammar allows (now and then preferring special
tokens and end-of-sequence, so that free text ends), and the result must
parse with the format's own parser and validate against the tool's schema.
The vocabularies are real (Qwen3's, gpt-oss's, Llama 3's), so a marker that
is one special token is that token, as the model writes it.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import weakref
from typing import Any

import jsonschema
import llguidance
import mlx.core as mx
import numpy as np
import pytest

from mlx_server.chat.call_formats import HARMONY, HERMES, LLAMA3_JSON, ToolCallFormat, format_named, grammar_writer
from mlx_server.chat.call_grammars import GrammarWriter
from mlx_server.chat.call_pieces import ContentPiece
from mlx_server.chat.grammars import OutputConstraint, ReasoningMarkers, build_grammar
from mlx_server.chat.output import HARMONY_REASONING, OutputParser, ReasoningPiece
from mlx_server.chat.tool_parsing import ToolCalling, parse_tool_calls
from mlx_server.chat.tool_prompts import template_tool
from mlx_server.engine.constrained import GrammarProcessor, GrammarTokenizer
from mlx_server.vocabulary import GrammarError, Tool, ToolGrammar
from testbed.tokenizers import load_tokenizer, tokenizer_directory

WEATHER = Tool(
    "get_weather",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days"],
    },
)
NO_PARAMETERS = Tool("list_files")
TOOLS = [WEATHER, NO_PARAMETERS]
NAMES = {tool.name for tool in TOOLS}
THINK = ReasoningMarkers("<think>", "</think>")


class Vocabulary:
    """One tokenizer as llguidance and the grammar writer see it."""

    def __init__(self, family: str) -> None:
        self.tokenizer = load_tokenizer(family)
        self.vocabulary = GrammarTokenizer(self.tokenizer)
        self.ll = self.vocabulary.get()
        self.writer = grammar_writer(self.tokenizer)
        self.eos = tuple(sorted(self.tokenizer.eos_token_ids))
        self.special = np.array(sorted(set(self.writer.special_ids()) | set(self.eos)))
        self.special = self.special[self.special < self.ll.vocab_size]

    def grammar(self, **fields: Any) -> str:
        grammar = build_grammar(OutputConstraint(tools=fields.pop("tools", TOOLS), eos=self.eos, **fields), self.writer)
        assert grammar is not None
        return grammar


@functools.cache
def vocabulary(family: str) -> Vocabulary:
    """Loaded once per run: a vocabulary takes a second or more to index."""
    return Vocabulary(family)


@pytest.fixture(params=["qwen3", "gptoss", "llama3"])
def any_vocabulary(request: pytest.FixtureRequest) -> Vocabulary:
    return vocabulary(str(request.param))


@pytest.fixture
def qwen3() -> Vocabulary:
    return vocabulary("qwen3")


@pytest.fixture
def llama() -> Vocabulary:
    return vocabulary("llama3")


@pytest.fixture
def harmony() -> Vocabulary:
    return vocabulary("gptoss")


def random_decode(vocabulary: Vocabulary, grammar: str, seed: int, prefix: str = "", limit: int = 3000) -> str:
    """Draw allowed tokens until end-of-sequence; ``prefix`` is fed first (free text the model chose)."""
    processor = GrammarProcessor(vocabulary.vocabulary, grammar)
    rng = np.random.default_rng(seed)
    logits = mx.zeros((1, vocabulary.ll.vocab_size))
    tokens: list[int] = [0]  # the processor reads the last token from its second call on

    def allowed_after(token: int | None) -> np.ndarray[Any, Any]:
        if token is not None:
            tokens.append(token)
        return np.array(processor(mx.array(tokens), logits)[0]) > -np.inf

    mask = allowed_after(None)
    for token in vocabulary.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []:
        assert mask[token], f"the grammar refused {vocabulary.tokenizer.decode([token])!r} of the prefix"
        mask = allowed_after(int(token))
    for _ in range(limit):
        allowed = np.flatnonzero(mask)
        if any(mask[token] for token in vocabulary.eos) and rng.random() < 0.5:
            return str(vocabulary.tokenizer.decode(tokens[1:]))
        special = vocabulary.special[mask[vocabulary.special]]
        pool = special if len(special) and rng.random() < 0.3 else allowed
        token = int(rng.choice(pool))
        if token in vocabulary.eos:  # end-of-sequence ends the output, as it does in the engine
            return str(vocabulary.tokenizer.decode(tokens[1:]))
        mask = allowed_after(token)
    raise AssertionError("the grammar never allowed end-of-sequence")


def assert_valid(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        arguments = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(arguments, WEATHER.parameters_schema())
        else:
            assert arguments == {}


FORMATS = ["hermes", "qwen3_coder", "mistral", "mistral_args", "llama3_json", "glm47", "kimi_k2", "gemma4",
           "pythonic"]  # fmt: skip


class TestEveryFormat:
    @pytest.mark.parametrize("name", FORMATS)
    @pytest.mark.parametrize("seed", range(3))
    def test_a_forced_call_parses_with_the_formats_own_parser(self, qwen3: Vocabulary, name: str, seed: int) -> None:
        """Required calls in each format: what the grammar lets through, mlx-lm's parser reads, and it validates."""
        call_format = format_named(name)
        text = random_decode(qwen3, qwen3.grammar(tool_mode="required", call_format=call_format), seed)
        content, calls = parse_tool_calls(text, call_format, NAMES, schemas=[template_tool(tool) for tool in TOOLS])
        assert not content.strip(), text
        assert_valid(calls)

    def test_special_markers_are_written_as_their_tokens(self, qwen3: Vocabulary) -> None:
        """Qwen's <tool_call> is one token (151657): the grammar allows that token, not '<' and the rest."""
        processor = GrammarProcessor(qwen3.vocabulary, qwen3.grammar(tool_mode="required", call_format=HERMES))
        mask = np.array(processor(mx.array([0]), mx.zeros((1, qwen3.ll.vocab_size)))[0]) > -np.inf
        assert np.flatnonzero(mask).tolist() == [qwen3.writer.token_id("<tool_call>")]

    def test_a_named_tool_is_the_only_one_called(self, any_vocabulary: Vocabulary) -> None:
        call_format = HARMONY if any_vocabulary.writer.is_token("<|channel|>") else HERMES
        grammar = any_vocabulary.grammar(tool_mode="required", forced_function="list_files", call_format=call_format)
        for seed in range(3):
            text = random_decode(any_vocabulary, grammar, seed)
            if call_format is HARMONY:
                text = text[text.rindex("<|channel|>") :]
            assert [call.name for call in parse_tool_calls(text, call_format, NAMES)[1]] == ["list_files"]


class TestLazyCalls:
    """``auto``: free until the model opens a call; from there, a valid call."""

    def test_text_and_reasoning_stay_free(self, qwen3: Vocabulary) -> None:
        processor = GrammarProcessor(qwen3.vocabulary, qwen3.grammar(tool_mode="auto", call_format=HERMES))
        tokens = [0, *qwen3.tokenizer.encode("<think>\nLet me see.</think>\n\nI will check", add_special_tokens=False)]
        for index in range(1, len(tokens) + 1):
            mask = np.array(processor(mx.array(tokens[:index]), mx.zeros((1, qwen3.ll.vocab_size)))[0])
            assert (mask > -np.inf).sum() > 100_000, "free: almost any token"

    @pytest.mark.parametrize("seed", range(4))
    def test_a_call_the_model_opens_is_valid(self, qwen3: Vocabulary, seed: int) -> None:
        grammar = qwen3.grammar(tool_mode="auto", call_format=HERMES)
        text = random_decode(qwen3, grammar, seed, prefix="Sure, let me look.<tool_call>")
        content, calls = parse_tool_calls(text, HERMES, NAMES)
        assert content.startswith("Sure, let me look.")
        assert_valid(calls)

    @pytest.mark.parametrize("seed", range(2))
    def test_a_text_marker_engages_the_grammar_too(self, llama: Vocabulary, seed: int) -> None:
        """Tools injected as a Hermes block into a template that knows none (Llama 3's): the marker is text."""
        assert not llama.writer.is_token("<tool_call>")
        grammar = llama.grammar(tool_mode="auto", call_format=HERMES)
        text = random_decode(llama, grammar, seed, prefix="Checking: <tool_call>")
        content, calls = parse_tool_calls(text, HERMES, NAMES)
        assert content.startswith("Checking:")
        assert_valid(calls)

    def test_llama_writes_a_bare_json_call_or_text(self, llama: Vocabulary) -> None:
        grammar = llama.grammar(tool_mode="auto", call_format=LLAMA3_JSON)
        assert_valid(parse_tool_calls(random_decode(llama, grammar, 0, prefix='{"name": "'), LLAMA3_JSON, NAMES)[1])
        text = random_decode(llama, grammar, 0, prefix="Hello")
        assert text.startswith("Hello") and not parse_tool_calls(text, LLAMA3_JSON, NAMES)[1]


class TestReasoning:
    @pytest.mark.parametrize("seed", range(3))
    def test_a_reasoning_model_may_think_before_a_forced_call(self, qwen3: Vocabulary, seed: int) -> None:
        grammar = qwen3.grammar(tool_mode="required", call_format=HERMES, reasoning=THINK)
        text = random_decode(qwen3, grammar, seed, prefix="<think>\nThe user wants weather.")
        parser = OutputParser(
            _think_syntax(), ToolCalling(HERMES, (("get_weather", "function"), ("list_files", "function")))
        )
        pieces = parser.feed(text) + parser.finish()
        assert any(isinstance(piece, ReasoningPiece) for piece in pieces)
        assert_valid(parser.calls)

    @pytest.mark.parametrize("seed", range(2))
    def test_gpt_oss_thinks_on_analysis_then_calls_on_commentary(self, harmony: Vocabulary, seed: int) -> None:
        grammar = harmony.grammar(tool_mode="required", call_format=HARMONY)
        text = random_decode(harmony, grammar, seed, prefix="<|channel|>analysis<|message|>Need weather.")
        parser = OutputParser(HARMONY_REASONING, ToolCalling(HARMONY, tuple((name, "function") for name in NAMES)))
        pieces = parser.feed(text) + parser.finish()
        reasoning = "".join(piece.text for piece in pieces if isinstance(piece, ReasoningPiece))
        assert reasoning.startswith("Need weather.")
        assert not "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece)).strip()
        assert_valid(parser.calls)

    def test_gpt_oss_answers_on_final_under_none(self, harmony: Vocabulary) -> None:
        grammar = harmony.grammar(tools=[], json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                        "required": ["ok"]}, call_format=HARMONY)  # fmt: skip
        text = random_decode(harmony, grammar, 0)
        parser = OutputParser(HARMONY_REASONING, None)
        content = "".join(
            piece.text for piece in parser.feed(text) + parser.finish() if isinstance(piece, ContentPiece)
        )
        assert json.loads(content) in ({"ok": True}, {"ok": False})


def _think_syntax() -> Any:
    from mlx_server.chat.output import ReasoningSyntax

    return ReasoningSyntax("<think>", "</think>")


class TestJsonOutput:
    @pytest.mark.parametrize("seed", range(3))
    def test_json_schema_output_validates(self, any_vocabulary: Vocabulary, seed: int) -> None:
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
            "required": ["ok", "tags"],
        }
        harmony = any_vocabulary.writer.is_token("<|channel|>")
        grammar = any_vocabulary.grammar(tools=[], json_schema=schema, call_format=HARMONY if harmony else HERMES)
        text = random_decode(any_vocabulary, grammar, seed)
        if harmony:
            text = text[text.rindex("<|message|>") + len("<|message|>") :]
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert set(value) == {"ok", "tags"}, "undeclared keys are not generated"

    def test_objects_are_closed_for_generation_but_data_is_left_alone(self, qwen3: Vocabulary) -> None:
        """additionalProperties is closed on object schemas only, never inside const or enum values."""
        schema = {"type": "object", "properties": {"mode": {"const": {"properties": {"x": 1}}}}, "required": ["mode"]}
        text = random_decode(qwen3, qwen3.grammar(tools=[], json_schema=schema), 0)
        assert json.loads(text) == {"mode": {"properties": {"x": 1}}}


class TestNone:
    def test_tool_choice_none_forbids_the_call_token_and_its_text(self, qwen3: Vocabulary) -> None:
        """Under none with tools offered: neither the <tool_call> token nor the text '<tool_call' may open a call."""
        grammar = qwen3.grammar(tools=[WEATHER], tool_mode="none", forbidden_markers=("<tool_call",))
        processor = GrammarProcessor(qwen3.vocabulary, grammar)
        tokens = [0, *qwen3.tokenizer.encode("It is sunny. <tool_call", add_special_tokens=False)]
        for index in range(1, len(tokens)):
            processor(mx.array(tokens[:index]), mx.zeros((1, qwen3.ll.vocab_size)))
        mask = np.array(processor(mx.array(tokens), mx.zeros((1, qwen3.ll.vocab_size)))[0])
        assert mask[qwen3.writer.token_id("<tool_call>")] == -np.inf
        assert all(mask[eos] > -np.inf for eos in qwen3.eos)
        assert mask[qwen3.writer.token_id("<think>")] > -np.inf, "reasoning stays possible"

    def test_free_generation_has_no_grammar(self, qwen3: Vocabulary) -> None:
        assert build_grammar(OutputConstraint(), qwen3.writer) is None


class TestArgumentsThatContainMarkers:
    def test_end_marker_text_inside_a_string_is_part_of_the_argument(self, qwen3: Vocabulary) -> None:
        """A file an agent writes may contain '</tool_call>': the grammar allows it inside the string."""
        write = Tool("write_file", parameters={"type": "object", "properties": {"text": {"type": "string"}},
                                               "required": ["text"]})  # fmt: skip
        grammar = qwen3.grammar(tools=[write], tool_mode="required", call_format=HERMES)
        prefix = '<tool_call>\n{"name": "write_file", "arguments": {"text": "a</tool_call>b"}}\n</tool_call>'
        # Inside the string the model writes the marker as text ("</" then "tool_call>"), not as the token.
        pieces = ['<tool_call>\n{"name": "write_file", "arguments": {"text": "a</', 'tool_call>b"}}\n</tool_call>']
        encoded = [token for piece in pieces for token in qwen3.tokenizer.encode(piece, add_special_tokens=False)]
        processor = GrammarProcessor(qwen3.vocabulary, grammar)
        tokens = [0]
        for token in encoded:
            mask = np.array(processor(mx.array(tokens), mx.zeros((1, qwen3.ll.vocab_size)))[0])
            assert mask[token] > -np.inf, qwen3.tokenizer.decode([token])
            tokens.append(int(token))
        calls = parse_tool_calls(prefix, HERMES, {"write_file"})[1]
        assert [json.loads(call.arguments) for call in calls] == [{"text": "a</tool_call>b"}]

    def test_inside_a_string_the_markers_token_is_not_offered(self, qwen3: Vocabulary) -> None:
        """llguidance's mask alone would offer the ``</tool_call>`` token there and then refuse it."""
        write = Tool("write_file", parameters={"type": "object", "properties": {"text": {"const": "a</tool_call>b"}},
                                               "required": ["text"]})  # fmt: skip
        grammar = qwen3.grammar(tools=[write], tool_mode="required", call_format=HERMES, parallel_calls=False)
        processor = GrammarProcessor(qwen3.vocabulary, grammar)
        prefix = '<tool_call>\n{"name": "write_file", "arguments": {"text": "a'
        tokens = [0]
        for token in qwen3.tokenizer.encode(prefix, add_special_tokens=False):
            processor(mx.array(tokens), mx.zeros((1, qwen3.ll.vocab_size)))
            tokens.append(int(token))
        mask = np.array(processor(mx.array(tokens), mx.zeros((1, qwen3.ll.vocab_size)))[0])
        closing = qwen3.writer.token_id("</tool_call>")
        assert closing is not None and mask[closing] == -np.inf
        assert not processor.matcher.is_error() and (mask > -np.inf).any()


class TestCustomTools:
    def test_a_custom_tool_input_follows_its_grammar(self, qwen3: Vocabulary) -> None:
        """A forced custom tool with a Lark grammar: its text is decoded under that grammar."""
        tool = Tool("shout", kind="custom", grammar=ToolGrammar("lark", 'start: "HEY" "!"+'))
        grammar = qwen3.grammar(tools=[tool], tool_mode="required", forced_function="shout")
        for seed in range(3):
            _, calls = parse_tool_calls(random_decode(qwen3, grammar, seed), HERMES, {"shout": "custom"})
            assert len(calls) == 1 and calls[0].arguments.startswith("HEY!")
            assert set(calls[0].arguments[3:]) == {"!"}


@pytest.mark.parametrize(
    ("constraint", "param"),
    [
        (OutputConstraint(json_schema={"type": "banana"}), "response_format.json_schema.schema"),
        (
            OutputConstraint(tools=[dataclasses.replace(WEATHER, parameters={"required": 1})], tool_mode="auto"),
            "tools[0].function.parameters",
        ),
    ],
    ids=["unknown type", "required is not a list"],
)
def test_invalid_schemas_name_the_field(constraint: OutputConstraint, param: str) -> None:
    with pytest.raises(GrammarError) as raised:
        build_grammar(constraint, GrammarWriter({}))
    assert raised.value.param == param
    assert param in str(raised.value)


def test_every_format_has_a_grammar_and_a_parser() -> None:
    """The formats mlx-lm parses, and harmony: each can write a call and read it back."""
    for name in [*FORMATS, "harmony"]:
        call_format: ToolCallFormat = format_named(name)
        assert call_format.name == name and callable(call_format.call) and callable(call_format.parse)
    assert isinstance(llguidance.LLMatcher, type)


def test_engines_over_one_tokenizer_share_one_vocabulary() -> None:
    """Indexing a vocabulary takes seconds (Gemma 3's 262k tokens: about 7), so it is done once per tokenizer."""
    tokenizer = load_tokenizer("qwen3")
    shared = GrammarTokenizer.of(tokenizer)
    assert GrammarTokenizer.of(tokenizer) is shared
    assert GrammarTokenizer.of(load_tokenizer("qwen3", template="{{ messages }}")) is not shared


def test_a_shared_vocabulary_does_not_keep_its_tokenizer_alive() -> None:
    """An unloaded model's tokenizer (and its vocabulary) can be freed: the shared map holds neither."""
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(tokenizer_directory("qwen3"))
    GrammarTokenizer.of(tokenizer).get()
    gone = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert gone() is None
