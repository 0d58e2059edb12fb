"""A tool call's arguments reach every dialect as they are written, read by the real SDKs (scripted engine).

The scripted engine writes a Hermes call token by token, as a model would:
the name goes out as soon as it is known, then argument pieces that the
SDKs accumulate into exactly the final arguments, and none of the call's
markup reaches the text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic import Anthropic
from openai import OpenAI

from .scripted import ScriptedServer, scripted_server

FILE_TEXT = "".join(f"line {number}: the quick brown fox jumps over the lazy dog\n" for number in range(40))
ARGUMENTS = {"file_path": "notes/fox.txt", "content": FILE_TEXT}
CALL = "I'll write it.<tool_call>\n" + json.dumps({"name": "Write", "arguments": ARGUMENTS}) + "\n</tool_call>"
WRITE_SCHEMA = {
    "type": "object",
    "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}},
    "required": ["file_path", "content"],
}


@pytest.fixture(scope="module")
def scripted() -> ScriptedServer:
    return scripted_server()


@pytest.fixture
def writing(scripted: ScriptedServer) -> ScriptedServer:
    """The engine's next reply is some text, then a long Write call."""
    scripted.engine.reply(CALL)
    return scripted


def openai_sdk(scripted: ScriptedServer) -> OpenAI:
    """The SDK over the in-process application (not closed by the SDK: the module's tests share the client)."""
    return OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=scripted.client, max_retries=0)


def argument_tokens(scripted: ScriptedServer) -> int:
    return len(scripted.engine.tokenizer.encode(json.dumps(ARGUMENTS)))


def test_anthropic_streams_input_json_that_the_sdk_accumulates_into_the_input(writing: ScriptedServer) -> None:
    sdk = Anthropic(base_url="http://localhost", api_key="unused", http_client=writing.client, max_retries=0)
    tools: Any = [{"name": "Write", "input_schema": WRITE_SCHEMA}]
    with sdk.messages.stream(model="scripted", max_tokens=4096, tools=tools,
                             messages=[{"role": "user", "content": "Write the fox file."}]) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_message()
    starts = [event for event in events if event.type == "content_block_start"]
    assert [block.content_block.type for block in starts] == ["text", "tool_use"]
    opened = starts[1].content_block
    assert opened.type == "tool_use" and opened.name == "Write"
    pieces = [event.delta.partial_json for event in events
              if event.type == "content_block_delta" and event.delta.type == "input_json_delta"]  # fmt: skip
    assert "".join(pieces) and json.loads("".join(pieces)) == ARGUMENTS
    assert len(pieces) >= argument_tokens(writing) / 4
    (text, call) = final.content
    assert text.type == "text" and text.text == "I'll write it."
    assert call.type == "tool_use" and call.input == ARGUMENTS and final.stop_reason == "tool_use"


def test_chat_streams_argument_chunks_that_concatenate_to_the_arguments(writing: ScriptedServer) -> None:
    sdk = openai_sdk(writing)
    tools: Any = [{"type": "function", "function": {"name": "Write", "parameters": WRITE_SCHEMA}}]
    messages: Any = [{"role": "user", "content": "Write the fox file."}]
    chunks = list(sdk.chat.completions.create(model="scripted", stream=True, tools=tools, messages=messages))
    call_parts = [part for chunk in chunks if chunk.choices for part in chunk.choices[0].delta.tool_calls or []]
    opening, *rest = call_parts
    assert opening.id and opening.function and opening.function.name == "Write"
    assert all(part.index == 0 and part.id is None for part in rest)
    arguments = "".join(part.function.arguments or "" for part in call_parts if part.function)
    assert json.loads(arguments) == ARGUMENTS
    assert len(rest) >= argument_tokens(writing) / 4
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == "I'll write it."
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"


def test_responses_streams_argument_deltas_and_a_done_with_the_whole_arguments(writing: ScriptedServer) -> None:
    sdk = openai_sdk(writing)
    tools: Any = [{"type": "function", "name": "Write", "parameters": WRITE_SCHEMA}]
    events = list(sdk.responses.create(model="scripted", stream=True, tools=tools, input="Write the fox file."))
    added = [event.item for event in events if event.type == "response.output_item.added"]
    assert [item.type for item in added] == ["message", "function_call"]
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    (done,) = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments and json.loads(done.arguments) == ARGUMENTS
    assert len(deltas) >= argument_tokens(writing) / 4
    (completed,) = [event.response for event in events if event.type == "response.completed"]
    (call,) = [item for item in completed.output if item.type == "function_call"]
    assert call.name == "Write" and call.arguments == done.arguments and call.status == "completed"
    assert {event.item_id for event in events if event.type == "response.function_call_arguments.delta"} == {call.id}


def test_a_call_cut_short_by_the_token_limit_is_not_a_call(scripted: ScriptedServer) -> None:
    """The limit ends the call mid-arguments: its pieces went out, but the reply ends as text that stopped."""
    scripted.engine.reply(CALL)
    response = scripted.client.post("/v1/chat/completions", json={
        "model": "scripted", "stream": True, "max_tokens": 30,
        "messages": [{"role": "user", "content": "Write the fox file."}],
        "tools": [{"type": "function", "function": {"name": "Write", "parameters": WRITE_SCHEMA}}],
    })  # fmt: skip
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    finish = [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]]
    assert finish[-1] == "length"
    content = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert "<tool_call>" not in content and '"arguments"' not in content
