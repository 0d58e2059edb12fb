"""End to end: the official ``ollama`` client against the real server and the default model.

What the scripted tests cannot show: real tokens streamed as NDJSON, a schema
given as ``format`` enforced by the grammar on a real model, and the prompt
cache serving Ollama's resent history like any dialect's.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest

from .conftest import RunningServer

pytestmark = pytest.mark.e2e

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["calm", "busy"]}, "level": {"type": "integer",
          "minimum": 1, "maximum": 5}}, "required": ["mood", "level"], "additionalProperties": False}  # fmt: skip


def test_a_streamed_chat_a_structured_answer_and_a_cached_turn(server: RunningServer) -> None:
    client = ollama.Client(host=server.base_url)
    messages = [{"role": "system", "content": "You are brief. " * 40}, {"role": "user", "content": "Say hi."}]
    parts = list(client.chat("default", messages=messages, stream=True, options={"num_predict": 12, "seed": 3}))
    assert "".join(part.message.content or "" for part in parts).strip()
    assert parts[-1].done and parts[-1].eval_count and parts[-1].prompt_eval_count

    answer = client.chat("default", messages=[*messages, {"role": "user", "content": "How are you?"}],
                         format=SCHEMA, options={"temperature": 0, "num_predict": 40})  # fmt: skip
    jsonschema.validate(json.loads(answer.message.content or ""), SCHEMA)

    body = {"model": "default", "stream": False, "messages": [*messages, {"role": "user", "content": "Again."}],
            "options": {"num_predict": 4}}  # fmt: skip
    again = httpx.post(f"{server.base_url}/api/chat", json=body, timeout=120)
    assert again.status_code == 200
    assert int(again.headers["x-prompt-cache-read-tokens"]) >= parts[-1].prompt_eval_count - 8  # the shared prefix
