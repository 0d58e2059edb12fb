"""Several models behind one server: every dialect routes by the request's model, and says which model answered.

A request names a model as its client knows it; it reaches the served model of
that name, else the first alias that matches, else the default model, and the
reply's ``model`` field, the log line and /metrics name the model that served
it.  /v1/models lists every model with its kind and state; /models/load and
/models/unload change that state.  Scripted models stand in for real ones.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mlx_server.chat.request import ChatRequest
from mlx_server.chat.service import ChatService
from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import ApiKeys, Settings
from mlx_server.vocabulary import Message

from .helpers import CHAT, COMPLETIONS, MESSAGES, RESPONSES, chat_body, messages_body
from .scripted import ScriptedModels, scripted_models

REGISTRY = Registry(
    (ModelSpec("main", None), ModelSpec("small", None), ModelSpec("embed", "/m/embed", "embedding")),
    (("claude-haiku-*", "small"),),
)


@pytest.fixture
def served() -> ScriptedModels:
    return scripted_models(REGISTRY)


def body_for(path: str, model: str, stream: bool = False) -> dict[str, Any]:
    if path == MESSAGES:
        return {**messages_body(), "model": model, "stream": stream}
    if path == RESPONSES:
        return {"model": model, "input": "Hi", "max_output_tokens": 4, "temperature": 0, "stream": stream}
    if path == COMPLETIONS:
        return {"model": model, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": stream}
    return {**chat_body(), "model": model, "stream": stream}


def model_field(path: str, response: Any) -> str:
    """The reply's model field, from the whole reply or from the stream's first event that has one."""
    if response.headers["content-type"].startswith("application/json"):
        body = response.json()
        return str(body.get("model") or body["response"]["model"])
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            found = (
                event.get("model") or event.get("message", {}).get("model") or event.get("response", {}).get("model")
            )
            if found:
                return str(found)
    raise AssertionError(f"no model field in {response.text[:300]}")


PATHS = [CHAT, MESSAGES, RESPONSES, COMPLETIONS]


class TestEveryDialectRoutes:
    @pytest.mark.parametrize("path", PATHS)
    @pytest.mark.parametrize(
        ("requested", "served_by"),
        [("small", "small"), ("claude-haiku-4-5-20251001", "small"), ("main", "main"), ("gpt-4o", "main")],
    )
    def test_by_name_alias_and_default(self, served: ScriptedModels, path: str, requested: str, served_by: str) -> None:
        response = served.client.post(path, json=body_for(path, requested))
        assert response.status_code == 200, response.text
        assert model_field(path, response) == served_by
        assert len(served.engine(served_by).requests) == 1

    @pytest.mark.parametrize("path", PATHS)
    def test_streams_name_the_model_too(self, served: ScriptedModels, path: str) -> None:
        response = served.client.post(path, json=body_for(path, "claude-haiku-4-5", stream=True))
        assert response.status_code == 200 and model_field(path, response) == "small"

    def test_count_tokens_counts_with_the_routed_models_template(self, served: ScriptedModels) -> None:
        body = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "Hi"}]}
        response = served.client.post("/v1/messages/count_tokens", json=body)
        assert response.status_code == 200 and response.json()["input_tokens"] > 0
        assert "small" in served.loader.loads

    @pytest.mark.parametrize("path", PATHS)
    def test_a_chat_request_to_the_embedding_model_is_a_400(self, served: ScriptedModels, path: str) -> None:
        response = served.client.post(path, json=body_for(path, "embed"))
        assert response.status_code == 400
        assert "embedding model" in response.text and "/v1/embeddings" in response.text

    def test_the_log_line_and_metrics_name_the_model(
        self, served: ScriptedModels, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level("INFO", logger="mlx"):
            served.client.post(CHAT, json=body_for(CHAT, "claude-haiku-4-5"))
        assert any("completed successfully" in r.message and r.message.endswith("model small") for r in caplog.records)
        metrics = served.client.get("/metrics").text
        assert 'mlx_server_completions_total{finish_reason="length",model="small"} 1.0' in metrics
        assert 'mlx_server_queue_requests{model="main",state="waiting"}' in metrics


class TestLoadingOnDemand:
    def test_a_streamed_request_to_a_model_still_loading_gets_keepalives_then_its_reply(self) -> None:
        served = scripted_models(REGISTRY, Settings(default_temperature=0.0, keepalive_interval=0.05), delay=0.5)
        response = served.client.post(CHAT, json=body_for(CHAT, "small", stream=True))
        assert response.status_code == 200
        lines = [line for line in response.text.splitlines() if line]
        assert lines[0] == ": keep-alive"
        assert lines[-1] == "data: [DONE]" and model_field(CHAT, response) == "small"

    def test_a_plain_request_waits_for_the_load(self) -> None:
        served = scripted_models(REGISTRY, delay=0.2)
        response = served.client.post(MESSAGES, json=body_for(MESSAGES, "small"))
        assert response.status_code == 200 and response.json()["model"] == "small"

    def test_a_model_that_does_not_fit_is_an_error_in_the_dialects_shape(self) -> None:
        sizes = {"main": 6, "small": 6}
        served = scripted_models(REGISTRY, sizes=sizes, budget=10)
        main = served.loader.models["main"].service
        assert isinstance(main, ChatService)
        asyncio.run(main.start(ChatRequest(messages=(Message("user", "Hi"),))))  # main is busy: it cannot make room
        anthropic = served.client.post(MESSAGES, json=body_for(MESSAGES, "small"))
        assert anthropic.status_code == 529 and anthropic.json()["error"]["type"] == "overloaded_error"
        openai = served.client.post(CHAT, json=body_for(CHAT, "small"))
        assert openai.status_code == 503 and openai.json()["error"]["code"] == "model_does_not_fit"
        assert "main (" in openai.json()["error"]["message"]


class TestTheModelsRoutes:
    def test_v1_models_lists_every_model_with_its_kind_and_state(self, served: ScriptedModels) -> None:
        listed = {card["id"]: card for card in served.client.get("/v1/models").json()["data"]}
        assert set(listed) == {"main", "small", "embed"}
        assert (listed["main"]["kind"], listed["main"]["state"]) == ("chat", "loaded")
        assert (listed["embed"]["kind"], listed["embed"]["state"]) == ("embedding", "unloaded")
        assert listed["small"]["aliases"] == ["claude-haiku-*"]

    def test_anthropic_clients_get_anthropics_shape(self, served: ScriptedModels) -> None:
        listed = served.client.get("/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
        assert [card["id"] for card in listed["data"]] == ["main", "small", "embed"]
        assert listed["first_id"] == "main" and listed["data"][0]["type"] == "model"

    def test_any_id_is_answered_as_the_model_it_reaches(self, served: ScriptedModels) -> None:
        card = served.client.get("/v1/models/claude-haiku-4-5").json()
        assert card["id"] == "claude-haiku-4-5" and card["kind"] == "chat"

    def test_load_and_unload(self, served: ScriptedModels) -> None:
        loaded = served.client.post("/models/load", json={"model": "small"})
        assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
        unloaded = served.client.post("/models/unload", json={"model": "small"})
        assert unloaded.json()["state"] == "unloaded"
        assert served.loader.models["small"].closed_with, "the model was closed"

    def test_a_pinned_model_is_a_409_in_either_dialect(self) -> None:
        pinned = Registry((ModelSpec("main", None, pinned=True), ModelSpec("small", None)))
        served = scripted_models(pinned)
        response = served.client.post("/models/unload", json={"model": "main"})
        assert response.status_code == 409 and response.json()["error"]["code"] == "model_pinned"
        assert served.client.get("/v1/models").json()["data"][0]["state"] == "loaded"

    def test_the_cache_report_of_a_model_that_is_not_loaded_loads_nothing(self, served: ScriptedModels) -> None:
        report = served.client.get("/v1/cache", params={"model": "small"}).json()
        assert report == {"model": "small", "state": "unloaded", "prompt_cache": None, "response_cache": None}
        assert served.loader.loads == ["main"]

    def test_model_control_can_be_turned_off(self) -> None:
        served = scripted_models(REGISTRY, Settings(default_temperature=0.0, model_control="off"))
        for path in ("/models/load", "/models/unload"):
            response = served.client.post(path, json={"model": "small"})
            assert response.status_code == 403 and "--model-control off" in response.json()["error"]["message"]
        assert served.loader.loads == ["main"]

    def test_an_admin_key_guards_model_control_and_nothing_else(self) -> None:
        settings = Settings(default_temperature=0.0, admin_keys=ApiKeys(["admin-key-5678"]))
        served = scripted_models(REGISTRY, settings)
        assert served.client.post("/models/load", json={"model": "small"}).status_code == 403
        wrong = served.client.post("/models/load", json={"model": "small"}, headers={"x-admin-key": "nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]["type"] == "permission_error"
        right = served.client.post("/models/load", json={"model": "small"}, headers={"x-admin-key": "admin-key-5678"})
        assert right.status_code == 200 and right.json()["state"] == "loaded"
        assert served.client.post(CHAT, json=body_for(CHAT, "main")).status_code == 200

    def test_an_unknown_model_is_a_404(self, served: ScriptedModels) -> None:
        response = served.client.post("/models/unload", json={"model": "nope"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
