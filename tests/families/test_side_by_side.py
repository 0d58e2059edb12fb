"""Two models of different families in one process share nothing by accident.

What each chat service knows of its model (template, tool-call format,
special tokens, stable prefixes, grammar verdicts) is its own profile's: the
same request, alternately to a Qwen3 and a gpt-oss model, gets each model's
own checkpoint of the system prompt and each model's own call format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from starlette.testclient import TestClient

from mlx_server.chat.prompts import ChatTemplate
from mlx_server.model.loading import LoadedModel, load_model
from mlx_server.vocabulary import Message, Tool
from testbed.serving import serve

from .test_family_matrix import FORECAST, SCHEMA

SYSTEM = "You are the forecaster of a small weather service. Answer with a call. " * 4


@pytest.fixture(scope="module")
def side_by_side(model_directories: dict[str, Path]) -> Iterator[dict[str, tuple[LoadedModel, TestClient]]]:
    served = {}
    engines = []
    for family in ("qwen3", "gpt_oss"):
        loaded = load_model(str(model_directories[family]))
        engine, client = serve(loaded, 32)
        served[family] = (loaded, client)
        engines.append(engine)
    yield served
    for engine in engines:
        engine.shutdown()


def forced_call(client: TestClient, seed: int) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Forecast {seed}?"}],
        "tools": [FORECAST], "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 120,
        "temperature": 1.0, "seed": seed,
    })  # fmt: skip
    assert response.status_code == 200, response.text
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    return json.loads(call["function"]["arguments"])  # type: ignore[no-any-return]


def checkpoints(client: TestClient) -> list[int]:
    entries = client.get("/v1/cache").json()["prompt_cache"]["entries_detail"]
    return [entry["tokens"] for entry in entries if entry["kind"] == "checkpoint"]


def test_the_same_request_alternately_gets_each_models_own_prefix_and_calls(
    side_by_side: dict[str, tuple[LoadedModel, TestClient]],
) -> None:
    for seed in range(4):
        for _, client in side_by_side.values():
            jsonschema.validate(forced_call(client, seed), SCHEMA)
    for loaded, client in side_by_side.values():
        template = ChatTemplate(loaded.tokenizer)
        messages = [Message("system", SYSTEM), Message("user", "Forecast 0?")]
        tool = Tool("get_forecast", FORECAST["function"]["description"], SCHEMA)  # type: ignore[index]
        _, prefix = template.tokens_with_prefix(messages, [tool])
        assert prefix > 0 and checkpoints(client) == [prefix], loaded.name
