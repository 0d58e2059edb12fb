"""Forced calls on the tiny Qwen3 model with the real Qwen3 tokenizer: every seeded request validates.

``<tool_call>`` is one special token in this vocabulary; the grammar writes
it as that token, so the model can open the call at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from starlette.testclient import TestClient

from mlx_server.model.loading import load_model
from testbed.serving import serve

from .test_family_matrix import FORECAST, SCHEMA, forced_anthropic

WRITE_FILE: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "write_file",
        "parameters": {
            "type": "object",
            "properties": {"path": {"enum": ["notes.txt"]}, "text": {"type": "string", "maxLength": 40}},
            "required": ["path", "text"],
        },
    },
}


@pytest.fixture(scope="module")
def qwen3(model_directories: dict[str, Path]) -> Iterator[TestClient]:
    engine, client = serve(load_model(str(model_directories["qwen3"])), 32)
    yield client
    engine.shutdown()


def forced_openai(client: TestClient, seed: int, tool_choice: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Forecast for Lima?"}], "tools": [FORECAST, WRITE_FILE],
        "tool_choice": tool_choice, "parallel_tool_calls": False, "max_tokens": 100, "temperature": 1.0, "seed": seed,
    })  # fmt: skip
    assert response.status_code == 200, response.text
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    return {"name": call["function"]["name"], "input": json.loads(call["function"]["arguments"])}


@pytest.mark.parametrize("seed", range(20))
def test_twenty_seeded_forced_calls_validate(qwen3: TestClient, seed: int) -> None:
    """Seeds 0-19 across ``required``, a named function and Anthropic's ``any``."""
    kind = seed % 3
    if kind == 0:
        call = forced_openai(qwen3, seed, "required")
    elif kind == 1:
        call = forced_openai(qwen3, seed, {"type": "function", "function": {"name": "get_forecast"}})
    else:
        call = forced_anthropic(qwen3, seed)
    schemas = {"get_forecast": SCHEMA, "write_file": WRITE_FILE["function"]["parameters"]}
    assert kind != 1 or call["name"] == "get_forecast"
    jsonschema.validate(call["input"], schemas[call["name"]])


def test_an_argument_holding_the_end_marker_comes_back_whole(qwen3: TestClient) -> None:
    """A file an agent writes may contain ``</tool_call>``: the call ends where its JSON ends, not there."""
    text = "a</tool_call>b"
    history = [
        {"role": "user", "content": "Save it."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "write_file", "arguments": json.dumps({"path": "notes.txt", "text": text})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "saved"},
        {"role": "user", "content": "Again, the same."},
    ]  # fmt: skip
    schema = {"type": "object", "properties": {"path": {"enum": ["notes.txt"]}, "text": {"const": text}},
              "required": ["path", "text"]}  # fmt: skip
    tool = {"type": "function", "function": {"name": "write_file", "parameters": schema}}
    response = qwen3.post("/v1/chat/completions", json={"messages": history, "tools": [tool], "tool_choice": "required",
                                                        "parallel_tool_calls": False, "max_tokens": 120})  # fmt: skip
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["text"] == text
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]
