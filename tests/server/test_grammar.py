"""Grammars from tools and schemas, and the logits mask, with a real vocabulary (Llama 3's).

Decoding here is driven by random logits instead of the model: whatever a
sampler picks under the mask must still parse and validate.
"""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import llguidance
import mlx.core as mx
import numpy as np
import pytest

from mlx_server.chat.grammars import OutputConstraint, build_grammar
from mlx_server.chat.tool_parsing import HERMES, parse_tool_calls
from mlx_server.engine.constrained import GrammarProcessor, GrammarTokenizer
from mlx_server.vocabulary import GrammarError, Tool, ToolGrammar

from .model_tokenizers import load_tokenizer

WEATHER = Tool(
    "get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    },
)
NO_PARAMETERS = Tool("list_files")


@pytest.fixture(scope="module")
def vocabulary() -> llguidance.LLTokenizer:
    return GrammarTokenizer(load_tokenizer("llama3")).get()


def random_decode(tokenizer: llguidance.LLTokenizer, grammar: str, seed: int, limit: int = 3000) -> str:
    """Sample from random logits under the grammar's mask until end-of-sequence."""
    processor = GrammarProcessor(tokenizer, grammar)
    rng = np.random.default_rng(seed)
    tokens: list[int] = [0]
    for _ in range(limit):
        logits = mx.array(rng.normal(size=(1, tokenizer.vocab_size + 64)).astype(np.float32))
        token = int(mx.argmax(processor(mx.array(tokens), logits)[0]))
        if token in tokenizer.eos_tokens:
            return tokenizer.decode_str(tokens[1:])
        tokens.append(token)
    raise AssertionError("the grammar never allowed end-of-sequence")


def test_free_generation_has_no_grammar() -> None:
    assert build_grammar(OutputConstraint()) is None
    assert build_grammar(OutputConstraint(tools=[WEATHER], tool_mode="auto")) is None


@pytest.mark.parametrize("seed", range(4))
def test_forced_call_always_parses_and_validates(vocabulary: llguidance.LLTokenizer, seed: int) -> None:
    grammar = build_grammar(OutputConstraint(tools=[WEATHER, NO_PARAMETERS], tool_mode="required"))
    assert grammar is not None
    text = random_decode(vocabulary, grammar, seed)
    content, calls = parse_tool_calls(text, HERMES, {"get_weather", "list_files"})
    assert calls and not content.strip()
    for call in calls:
        arguments = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(arguments, WEATHER.parameters_schema())
        else:
            assert arguments == {}


def test_named_function_is_the_only_one_called(vocabulary: llguidance.LLTokenizer) -> None:
    grammar = build_grammar(
        OutputConstraint(tools=[WEATHER, NO_PARAMETERS], tool_mode="required", forced_function="list_files")
    )
    assert grammar is not None
    for seed in range(3):
        calls = parse_tool_calls(random_decode(vocabulary, grammar, seed), HERMES, {"get_weather", "list_files"})[1]
        assert [call.name for call in calls] == ["list_files"]


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output_validates(vocabulary: llguidance.LLTokenizer, seed: int) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
        "required": ["ok", "tags"],
    }
    grammar = build_grammar(OutputConstraint(json_schema=schema))
    assert grammar is not None
    value = json.loads(random_decode(vocabulary, grammar, seed))
    jsonschema.validate(value, schema)
    assert set(value) == {"ok", "tags"}, "undeclared keys are not generated"


def test_objects_are_closed_for_generation_but_data_is_left_alone(vocabulary: llguidance.LLTokenizer) -> None:
    """additionalProperties is closed on object schemas only, never inside const or enum values."""
    schema = {
        "type": "object",
        "properties": {"mode": {"const": {"properties": {"x": 1}}}},
        "required": ["mode"],
    }
    grammar = build_grammar(OutputConstraint(json_schema=schema))
    assert grammar is not None
    assert json.loads(random_decode(vocabulary, grammar, 0)) == {"mode": {"properties": {"x": 1}}}


@pytest.mark.parametrize(
    ("constraint", "param"),
    [
        (OutputConstraint(json_schema={"type": "banana"}), "response_format.json_schema.schema"),
        (
            OutputConstraint(
                tools=[dataclasses.replace(WEATHER, parameters={"required": 1})],
                tool_mode="auto",
            ),
            "tools[0].function.parameters",
        ),
    ],
    ids=["unknown type", "required is not a list"],
)
def test_invalid_schemas_name_the_field(constraint: OutputConstraint, param: str) -> None:
    with pytest.raises(GrammarError) as raised:
        build_grammar(constraint)
    assert raised.value.param == param
    assert param in str(raised.value)


def _feed(processor: GrammarProcessor, vocabulary: llguidance.LLTokenizer, tokens: list[int], text: str) -> mx.array:
    """Feed ``text`` token by token (each must be allowed); returns the mask after it."""
    logits = mx.zeros((1, vocabulary.vocab_size))
    masked = processor(mx.array(tokens), logits)
    for token in vocabulary.tokenize_str(text):
        assert np.array(masked[0])[token] > -np.inf, f"{vocabulary.decode_str([token])!r} is allowed on the way"
        tokens.append(token)
        masked = processor(mx.array(tokens), logits)
    return masked


def test_tool_choice_none_forbids_the_call_marker(vocabulary: llguidance.LLTokenizer) -> None:
    """Under tool_choice none with tools offered, text may not open a call; anything else is free."""
    grammar = build_grammar(OutputConstraint(tools=[WEATHER], tool_mode="none", forbidden_markers=("<tool_call>",)))
    assert grammar is not None
    processor = GrammarProcessor(vocabulary, grammar)
    masked = _feed(processor, vocabulary, [0], "It is sunny. <tool_call")
    closing = vocabulary.tokenize_str(">")[0]
    assert np.array(masked[0])[closing] == -np.inf
    assert all(np.array(masked[0])[eos] > -np.inf for eos in vocabulary.eos_tokens)


def test_a_custom_tool_input_follows_its_grammar(vocabulary: llguidance.LLTokenizer) -> None:
    """A forced custom tool with a Lark grammar: its text is decoded under that grammar."""
    tool = Tool("shout", kind="custom", grammar=ToolGrammar("lark", 'start: "HEY" "!"+'))
    grammar = build_grammar(OutputConstraint(tools=[tool], tool_mode="required", forced_function="shout"))
    assert grammar is not None
    for seed in range(3):
        text = random_decode(vocabulary, grammar, seed)
        _, calls = parse_tool_calls(text, HERMES, {"shout": "custom"})
        assert len(calls) == 1 and calls[0].arguments.startswith("HEY!")
        assert set(calls[0].arguments[3:]) == {"!"}
