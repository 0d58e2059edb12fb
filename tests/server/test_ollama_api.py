"""Ollama's API, driven by the official ``ollama`` Python client over real HTTP, on scripted models.

The apps that speak only Ollama (editors' Ollama providers, Open WebUI, Raycast)
list models with ``/api/tags``, read capabilities with ``/api/show`` and chat over
``/api/chat``; each is checked here in the shape the client parses, the rest
(the engine, the cache, grammars on a real model) in tests/server/test_ollama_e2e.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import ollama
import pytest

from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings
from testbed.documents import png

from .scripted import ScriptedEmbedder, ScriptedModels, scripted_models, served_over_http, tool_round_trip

REGISTRY = Registry((ModelSpec("chat", None), ModelSpec("embed", "/m/embed", "embedding")))
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ScriptedModels, str]]:
    models = scripted_models(REGISTRY, Settings(default_temperature=0.0, response_cache_size=0))
    with served_over_http(models) as base_url:
        yield models, base_url


@pytest.fixture
def client(served: tuple[ScriptedModels, str]) -> ollama.Client:
    return ollama.Client(host=served[1])


def test_version_and_model_list(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    assert httpx.get(f"{served[1]}/api/version").json()["version"]
    listed = {model.model: model for model in client.list().models}
    assert set(listed) == {"chat:latest", "embed:latest"}
    assert listed["chat:latest"].details is not None and listed["chat:latest"].digest


def test_show_says_what_a_model_can_do(client: ollama.Client) -> None:
    shown = client.show("chat:latest")
    assert shown.capabilities is not None and {"completion", "tools"} <= set(shown.capabilities)
    assert "vision" not in shown.capabilities  # the scripted model reads text only
    assert shown.modelinfo is not None and any(key.endswith(".context_length") for key in shown.modelinfo)
    assert client.show("embed").capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error


def test_chat_whole_and_streamed(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    models.engine("chat").reply("Hello there, friend.", "Hello there, friend.")
    whole = client.chat("chat", messages=[{"role": "user", "content": "Hi"}], options={"temperature": 0})
    assert whole.message.role == "assistant" and whole.message.content == "Hello there, friend."
    assert whole.done and whole.done_reason == "stop"
    assert whole.prompt_eval_count and whole.eval_count and whole.total_duration
    parts = list(client.chat("chat", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert "".join(part.message.content or "" for part in parts) == "Hello there, friend."
    assert len(parts) > 2 and [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count


def test_options_reach_the_engine(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    options = {"temperature": 0.3, "top_p": 0.9, "top_k": 20, "repeat_penalty": 1.2, "seed": 7, "stop": ["END"],
               "num_predict": 5, "num_ctx": 2048, "num_gpu": 99}  # fmt: skip
    client.chat("chat", messages=[{"role": "user", "content": "Hi"}], options=options)
    request = models.engine("chat").requests[-1]
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.3, 0.9, 20, 7)
    assert sampling.repetition_penalty == 1.2 and "END" in sampling.stop
    assert request.max_tokens == 5


def test_a_tool_round_trip(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    engine = models.engine("chat")
    engine.respond_with(tool_round_trip("get_weather", {"city": "Tokyo"}, answer="Sunny in Tokyo."))
    try:
        messages: list[Any] = [{"role": "user", "content": "Weather in Tokyo?"}]
        first = client.chat("chat", messages=messages, tools=[WEATHER])
        (call,) = first.message.tool_calls or []
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Tokyo"}
        messages += [first.message, {"role": "tool", "content": "sunny, 24C", "tool_name": "get_weather"}]
        streamed = list(client.chat("chat", messages=messages, tools=[WEATHER], stream=True))
    finally:
        engine.respond_with(lambda _request, _prompt: None)
    assert "".join(part.message.content or "" for part in streamed) == "Sunny in Tokyo."
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt)
    assert "sunny, 24C" in prompt.rsplit("<tool_response>", 1)[-1] and '"city": "Tokyo"' in prompt


def test_a_streamed_call_arrives_whole(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    models.engine("chat").reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    parts = list(client.chat("chat", messages=[{"role": "user", "content": "Oslo?"}], tools=[WEATHER], stream=True))
    calls = [call for part in parts for call in part.message.tool_calls or []]
    assert [(call.function.name, call.function.arguments) for call in calls] == [("get_weather", {"city": "Oslo"})]
    assert not "".join(part.message.content or "" for part in parts)


def test_format_and_think_reach_the_core(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    models.engine("chat").reply('{"ok": true}')
    reply = client.chat("chat", messages=[{"role": "user", "content": "JSON"}], format=schema, think=False)
    assert json.loads(reply.message.content or "") == {"ok": True}
    assert models.engine("chat").requests[-1].grammar is not None, "the schema constrains the output"


def test_generate_through_the_template_and_raw(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    engine = models.engine("chat")
    engine.reply("Blue.", "Blue.")
    reply = client.generate("chat", "Why is the sky blue?", system="Answer in one word.")
    assert reply.response == "Blue." and reply.done
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt)
    assert "<|im_start|>system\nAnswer in one word." in prompt and "Why is the sky blue?" in prompt
    client.generate("chat", "def add(a, b):", raw=True)
    assert engine.tokenizer.decode(engine.requests[-1].prompt) == "def add(a, b):"


def test_an_image_on_a_text_model_is_left_out_and_said(served: tuple[ScriptedModels, str]) -> None:
    _, base_url = served
    image = base64.b64encode(png()).decode()
    body = {"model": "chat", "stream": False, "messages": [{"role": "user", "content": "What is this?",
                                                            "images": [image]}]}  # fmt: skip
    response = httpx.post(f"{base_url}/api/chat", json=body)
    assert response.status_code == 200 and response.headers["x-attachments-left-out"] == "1 image"
    bad = httpx.post(f"{base_url}/api/chat", json={**body, "messages": [{"role": "user", "images": ["%%%"]}]})
    assert bad.status_code == 400 and "base64" in bad.json()["error"]


def test_embed_and_the_older_embeddings(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    models, _ = served
    reply = client.embed("embed", ["one", "two three"])
    tokenizer = models.embedder("embed").tokenizer
    expected = [ScriptedEmbedder.vector(tokenizer.encode(text)) for text in ("one", "two three")]
    assert np.allclose(np.array(reply.embeddings), np.stack(expected), atol=1e-6)
    older = client.embeddings("embed", "one")
    assert np.allclose(older.embedding, expected[0], atol=1e-6)


def test_load_and_unload_with_keep_alive(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    _, base_url = served

    def running() -> list[str]:
        return [model.model or "" for model in client.ps().models]

    assert "chat:latest" in running()
    response = httpx.post(f"{base_url}/api/chat", json={"model": "embed", "messages": [], "keep_alive": 0})
    assert response.status_code == 400, "an embedding model does not chat"
    unloaded = httpx.post(f"{base_url}/api/generate", json={"model": "chat", "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload" and "chat:latest" not in running()
    loaded = httpx.post(f"{base_url}/api/generate", json={"model": "chat"}).json()
    assert loaded["done_reason"] == "load" and "chat:latest" in running()


def test_pull_loads_a_served_model(client: ollama.Client, served: tuple[ScriptedModels, str]) -> None:
    _, base_url = served
    httpx.post(f"{base_url}/api/generate", json={"model": "chat", "keep_alive": 0})
    events = list(client.pull("chat", stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    assert "chat:latest" in [model.model for model in client.ps().models]
    assert client.pull("chat").status == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("org/elsewhere")
    assert missing.value.status_code == 404 and "--model org/elsewhere=REPO_ID" in missing.value.error


def test_keep_alive_becomes_the_models_time_to_live() -> None:
    """``keep_alive`` on a chat: the model unloads once idle that long (0: as soon as its requests are done)."""
    models = scripted_models(REGISTRY, Settings(default_temperature=0.0, response_cache_size=0))
    with served_over_http(models) as base_url:
        client = ollama.Client(host=base_url)
        client.chat("chat", messages=[{"role": "user", "content": "Hi"}], keep_alive="10m")
        assert [status.ttl for status in models.pool.describe() if status.name == "chat"] == [600.0]
        client.chat("chat", messages=[{"role": "user", "content": "Hi"}], keep_alive=0)
        deadline = time.monotonic() + 10
        while "chat:latest" in [model.model for model in client.ps().models] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "chat:latest" not in [model.model for model in client.ps().models]
        with pytest.raises(ollama.ResponseError) as bad:
            client.chat("chat", messages=[{"role": "user", "content": "Hi"}], keep_alive="a while")
        assert bad.value.status_code == 400 and "keep_alive" in bad.value.error


def test_unloading_follows_the_model_control_policy() -> None:
    models = scripted_models(REGISTRY, Settings(default_temperature=0.0, model_control="off"))
    refused = models.client.post("/api/generate", json={"model": "chat", "keep_alive": 0})
    assert refused.status_code == 403 and "--model-control off" in refused.json()["error"]


def test_errors_are_ollamas_shape(served: tuple[ScriptedModels, str]) -> None:
    _, base_url = served
    invalid = httpx.post(f"{base_url}/api/chat", json={"model": "chat", "messages": [{"role": "robot"}]})
    assert invalid.status_code == 400 and isinstance(invalid.json()["error"], str)
    options = httpx.post(f"{base_url}/api/chat", json={"model": "chat", "options": {"temperature": "hot"},
                                                       "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    assert options.status_code == 400 and "temperature" in options.json()["error"]
    assert httpx.get(f"{base_url}/api/nothing").status_code == 404


def test_an_open_webui_session(served: tuple[ScriptedModels, str]) -> None:
    """The requests Open WebUI's Ollama connection makes, as its backend builds them (backend/open_webui/routers/
    ollama.py and utils/payload.py: the model list, a capability check, a streamed chat with its options and
    keep_alive, then a turn carrying the assistant's thinking, an object-argument call, its result and an image
    trimmed from a data URL, and a JSON-format title request). Reconstructed from its source, not recorded."""
    models, base_url = served
    engine = models.engine("chat")
    assert httpx.get(f"{base_url}/api/version").status_code == 200
    names = [model["model"] for model in httpx.get(f"{base_url}/api/tags").json()["models"]]
    assert "chat:latest" in names and httpx.get(f"{base_url}/api/ps").status_code == 200
    assert "completion" in httpx.post(f"{base_url}/api/show", json={"model": "chat:latest"}).json()["capabilities"]
    options = {"temperature": 0.8, "top_p": 0.9, "num_ctx": 2048, "num_predict": 64, "stop": ["<|eot|>"],
               "seed": 1, "mirostat": 0, "use_mmap": True}  # fmt: skip
    opening: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    first = {"model": "chat:latest", "stream": True, "keep_alive": "5m", "options": options, "messages": opening}
    engine.reply("Let me check.")
    lines = httpx.post(f"{base_url}/api/chat", json=first).text.splitlines()
    assert [json.loads(line)["done"] for line in lines][-1] is True
    image = base64.b64encode(png()).decode()
    second = {**first, "messages": [
        *opening,
        {"role": "assistant", "content": "", "thinking": "They want the weather.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "rain, 9C"},
        {"role": "user", "content": "And this picture?", "images": [image]},
    ], "tools": [WEATHER]}  # fmt: skip
    engine.reply("Rain in Oslo.")
    answered = httpx.post(f"{base_url}/api/chat", json=second)
    assert answered.status_code == 200 and answered.headers["x-attachments-left-out"] == "1 image"
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt)
    assert "rain, 9C" in prompt and '"city": "Oslo"' in prompt
    title = {"model": "chat:latest", "stream": False, "format": "json",
             "messages": [{"role": "user", "content": "Title for this chat, as JSON"}]}  # fmt: skip
    engine.reply('{"title": "Weather"}')
    assert json.loads(httpx.post(f"{base_url}/api/chat", json=title).json()["message"]["content"]) == {
        "title": "Weather"
    }
