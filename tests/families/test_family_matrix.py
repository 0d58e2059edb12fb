"""Every family users run, as a tiny random-weight model behind the real server: what each one must do.

One module-scoped server per family (``served``), with a twin that has no
prompt cache; greedy decoding, so the two must agree token for token.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import mlx.core as mx
import pytest

from testbed.serving import Served

SYSTEM = "You are a careful assistant who answers briefly. " * 12
FORECAST = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
SCHEMA = FORECAST["function"]["parameters"]  # type: ignore[index]
NOTE = {
    "type": "function",
    "function": {
        "name": "save_note",
        "parameters": {
            "type": "object",
            "properties": {"title": {"enum": ["todo", "idea"]}, "text": {"type": "string", "maxLength": 48}},
            "required": ["title", "text"],
            "additionalProperties": False,
        },
    },
}


def forced_anthropic(client: Any, seed: int) -> dict[str, Any]:
    """A /v1/messages call forced with ``tool_choice: any``: the one tool_use block's name and input."""
    response = client.post("/v1/messages", json={
        "model": "tiny", "max_tokens": 100, "temperature": 1.0, "seed": seed,
        "messages": [{"role": "user", "content": "Forecast for Oslo?"}],
        "tools": [{"name": "get_forecast", "input_schema": SCHEMA}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    })  # fmt: skip
    assert response.status_code == 200, response.text
    (call,) = [block for block in response.json()["content"] if block["type"] == "tool_use"]
    return {"name": call["name"], "input": call["input"]}


def chat(client: Any, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 10, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def conversation(served: Served, turns: int, reply_as_sent: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each turn to the cached and the uncached server; the history holds ``reply_as_sent(reply)``."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    answers = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what changed since the last one? " * 3})
        cached, uncached = chat(served.client, messages), chat(served.uncached, messages)
        answers.append((cached, uncached))
        messages.append({"role": "assistant", "content": reply_as_sent(cached["choices"][0]["message"])})
    return answers


def test_half_precision_weights_load_and_answer(served: Served) -> None:
    """float16 as saved; a mixture-of-experts model on a CPU is cast to float32 (MLX's CPU gather_mm)."""
    dtypes = {parameter.dtype for _, parameter in _parameters(served.loaded.model)}
    moe_on_cpu = "float32" in served.loaded.weight_format and mx.default_device().type == mx.DeviceType.cpu
    assert dtypes == ({mx.float32} if moe_on_cpu else {mx.float16})
    assert moe_on_cpu == (served.family in {"qwen3_moe", "qwen3_next", "gpt_oss"})
    body = chat(served.client, [{"role": "user", "content": "Hello"}])
    assert body["usage"]["completion_tokens"] > 0


def _parameters(model: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    flat: Any = tree_flatten(model.parameters())
    return list(flat)


class TestGrowingConversation:
    def test_each_turn_reads_the_previous_prompt_from_the_cache(self, served: Served) -> None:
        answers = conversation(served, 3, lambda message: message["content"] or "")
        for (previous, _), (current, _) in zip(answers, answers[1:]):
            assert current["usage"]["prompt_tokens_details"]["cached_tokens"] >= previous["usage"]["prompt_tokens"] - 4

    def test_outputs_equal_the_uncached_servers(self, served: Served) -> None:
        for cached, uncached in conversation(served, 3, lambda message: message["content"] or ""):
            assert cached["choices"][0]["message"] == uncached["choices"][0]["message"]

    def test_a_reply_that_re_renders_differently_still_reuses_the_prompt_before_it(self, served: Served) -> None:
        """As when the client drops the reasoning: the next prompt differs from what was generated."""
        answers = conversation(served, 3, lambda message: "(reasoning dropped) Done.")
        for (previous, _), (current, uncached) in zip(answers, answers[1:]):
            assert current["usage"]["prompt_tokens_details"]["cached_tokens"] >= previous["usage"]["prompt_tokens"] - 4
            assert current["choices"][0]["message"] == uncached["choices"][0]["message"]


def test_speculative_decoding_changes_no_token(served: Served) -> None:
    """Greedy output with prompt lookup equals output without it (random models repeat, so drafts are kept)."""
    for prompt in ("Repeat after me: alpha beta gamma delta alpha beta gamma delta", "Tell me a story."):
        messages = [{"role": "user", "content": prompt}]
        speculated = chat(served.client, messages, max_tokens=32)
        plain = chat(served.plain, messages, max_tokens=32)
        assert speculated["choices"][0]["message"] == plain["choices"][0]["message"]


def test_concurrent_requests_batch_and_each_matches_its_own_run(served: Served) -> None:
    prompts = [[{"role": "user", "content": f"Item {index}: " + "describe it. " * (3 + index)}] for index in range(4)]
    alone = [chat(served.uncached, messages, max_tokens=6) for messages in prompts]
    steps_before = served.engine.stats().decode_steps
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda messages: chat(served.client, messages, max_tokens=6), prompts))
    for body in together:
        assert body["usage"]["completion_tokens"] == 6 or body["choices"][0]["finish_reason"] == "stop"
    generated = sum(body["usage"]["completion_tokens"] for body in together)
    assert served.engine.stats().decode_steps - steps_before < generated  # steps that decoded several at once
    assert all(
        body["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"] for body, single in zip(together, alone)
    )


class TestToolCalls:
    @pytest.mark.parametrize(
        "tool_choice",
        ["required", {"type": "function", "function": {"name": "get_forecast"}}],
        ids=["required", "named"],
    )
    def test_a_forced_call_validates(self, served: Served, tool_choice: Any) -> None:
        body = chat(served.client, [{"role": "user", "content": "Forecast for Lima?"}], tools=[FORECAST],
                    tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=100, temperature=1.0,
                    seed=1)  # fmt: skip
        (call,) = body["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "get_forecast"
        jsonschema.validate(_json(call["function"]["arguments"]), SCHEMA)
        assert body["choices"][0]["finish_reason"] == "tool_calls"

    def test_a_streamed_call_sends_its_arguments_as_written(self, served: Served) -> None:
        """In the family's own call format: pieces every few tokens that add up to the whole reply's arguments."""
        messages = [{"role": "user", "content": "Save a note."}]
        fields: dict[str, Any] = {"tools": [NOTE], "max_tokens": 120,
                  "tool_choice": {"type": "function", "function": {"name": "save_note"}}, "temperature": 1.0,
                  "seed": 5, "parallel_tool_calls": False}  # fmt: skip
        (whole,) = chat(served.client, messages, **fields)["choices"][0]["message"]["tool_calls"]
        response = served.client.post("/v1/chat/completions", json={"messages": messages, **fields, "stream": True})
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        opening, *pieces = [part for chunk in chunks if chunk["choices"]
                            for part in chunk["choices"][0]["delta"].get("tool_calls", [])]  # fmt: skip
        assert opening["function"] == {"name": "save_note", "arguments": ""}
        arguments = "".join(piece["function"]["arguments"] for piece in pieces)
        assert arguments == whole["function"]["arguments"]
        jsonschema.validate(_json(arguments), NOTE["function"]["parameters"])  # type: ignore[index]
        assert len(pieces) >= len(served.loaded.tokenizer.encode(arguments)) / 4

    def test_anthropic_any_validates(self, served: Served) -> None:
        jsonschema.validate(forced_anthropic(served.client, seed=2)["input"], SCHEMA)

    def test_a_call_the_model_opens_on_its_own_validates(self, eager: Served) -> None:
        """Under tool_choice auto, a model that opens a call (here one biased to) is held to the schema."""
        body = chat(eager.client, [{"role": "user", "content": "Forecast for Paris?"}], tools=[FORECAST],
                    max_tokens=60, temperature=1.0, seed=3, parallel_tool_calls=False)  # fmt: skip
        calls = body["choices"][0]["message"]["tool_calls"]
        assert calls, body
        for call in calls:
            jsonschema.validate(_json(call["function"]["arguments"]), SCHEMA)


def test_json_schema_output_validates(served: Served) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    # Room for a reasoning model's thought (half of max_tokens at most), gpt-oss's channel framing and the JSON.
    body = chat(served.client, [{"role": "user", "content": "Answer in JSON."}], max_tokens=64, temperature=1.0,
                seed=4, response_format=response_format)  # fmt: skip
    jsonschema.validate(_json(body["choices"][0]["message"]["content"]), schema)


def _json(text: str) -> Any:
    return json.loads(text)
