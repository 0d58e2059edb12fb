"""Sampling defaults that belong to the model: a request wins, then the server's --default-* options, then the
model's own file (generation_config.json, or the default model's card), then plain sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mlx_server.model.generation_config import DEFAULT_MODEL_SAMPLING, read_generation_config
from mlx_server.settings import Settings
from mlx_server.vocabulary import PLAIN_SAMPLING, RecommendedSampling, Sampling

from .helpers import CHAT, MESSAGES, chat_body, messages_body
from .scripted import ScriptedServer, scripted_server

QWEN3 = RecommendedSampling(Sampling(temperature=0.6, top_p=0.95, top_k=20), "generation_config.json")


def served_sampling(server: ScriptedServer) -> Sampling:
    return server.engine.requests[-1].sampling


class TestLayers:
    def test_a_request_that_sets_nothing_samples_as_the_model_recommends(self) -> None:
        server = scripted_server(Settings(response_cache_size=0), recommended=QWEN3)
        body = chat_body()
        del body["temperature"]
        assert server.client.post(CHAT, json=body).status_code == 200
        assert served_sampling(server) == QWEN3.sampling.over(PLAIN_SAMPLING)

    def test_the_request_wins_field_by_field(self) -> None:
        server = scripted_server(Settings(response_cache_size=0), recommended=QWEN3)
        server.client.post(CHAT, json=chat_body(temperature=0.3, top_k=5))
        sampling = served_sampling(server)
        assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.3, 5, 0.95)

    def test_the_servers_options_win_over_the_models(self) -> None:
        settings = Settings(response_cache_size=0, default_temperature=0.0, default_repetition_penalty=1.3)
        server = scripted_server(settings, recommended=QWEN3)
        body = messages_body()
        del body["temperature"]
        server.client.post(MESSAGES, json=body)
        sampling = served_sampling(server)
        assert (sampling.temperature, sampling.repetition_penalty, sampling.top_p) == (0.0, 1.3, 0.95)

    def test_without_a_recommendation_sampling_is_plain(self) -> None:
        server = scripted_server(Settings(response_cache_size=0))
        body = chat_body()
        del body["temperature"]
        server.client.post(CHAT, json=body)
        assert served_sampling(server) == PLAIN_SAMPLING


class TestTheModelsFile:
    def test_generation_config_is_read(self, tmp_path: Path) -> None:
        (tmp_path / "generation_config.json").write_text(
            json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": 2})
        )
        assert read_generation_config(tmp_path) == QWEN3

    @pytest.mark.parametrize(
        "document", [{"temperature": 7}, {"top_p": 0}, {"top_k": -1}, {"top_k": 2.5}, {"temperature": "hot"}, [1]]
    )
    def test_values_out_of_range_are_ignored(self, tmp_path: Path, document: object) -> None:
        (tmp_path / "generation_config.json").write_text(json.dumps(document))
        assert read_generation_config(tmp_path) == RecommendedSampling()

    def test_no_file_and_an_unreadable_file_say_nothing(self, tmp_path: Path) -> None:
        assert read_generation_config(tmp_path) == RecommendedSampling()
        (tmp_path / "generation_config.json").write_text("{not json")
        assert read_generation_config(tmp_path) == RecommendedSampling()

    def test_the_default_model_follows_its_card(self) -> None:
        """SmolLM2-135M-Instruct's card: temperature 0.2, top_p 0.9; a repetition penalty keeps it out of loops."""
        card = DEFAULT_MODEL_SAMPLING.sampling
        assert (card.temperature, card.top_p) == (0.2, 0.9) and card.repetition_penalty is not None


def test_the_start_up_line_says_which_defaults_are_in_force_and_where_from() -> None:
    settings = Settings(response_cache_size=0, default_repetition_penalty=1.3)
    server = scripted_server(settings, recommended=QWEN3)
    server.client.post(CHAT, json=chat_body())
    line = server.service.sampling_line()
    assert "temperature 0.6 (generation_config.json)" in line
    assert "repetition_penalty 1.3 (--default-repetition-penalty)" in line
    assert "otherwise plain" in line


class TestStructuredOutput:
    """A default repetition penalty would break JSON (keys, quotes and braces repeat): it stays off forced output."""

    FORCED: ClassVar[dict[str, Any]] = {
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required",
    }  # fmt: skip

    def test_a_forced_call_samples_without_the_models_penalty(self) -> None:
        recommended = RecommendedSampling(Sampling(temperature=0.2, repetition_penalty=1.1), "card")
        server = scripted_server(Settings(response_cache_size=0), recommended=recommended)
        server.engine.reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
        body = {**chat_body(max_tokens=40), **self.FORCED}
        del body["temperature"]
        assert server.client.post(CHAT, json=body).status_code == 200
        sampling = served_sampling(server)
        assert (sampling.temperature, sampling.repetition_penalty) == (0.2, PLAIN_SAMPLING.repetition_penalty)
        assert server.engine.requests[-1].grammar is not None

    def test_a_penalty_the_request_asks_for_still_applies(self) -> None:
        server = scripted_server(Settings(response_cache_size=0))
        server.engine.reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
        server.client.post(CHAT, json={**chat_body(max_tokens=40), **self.FORCED, "repetition_penalty": 1.2})
        assert served_sampling(server).repetition_penalty == 1.2

    def test_tools_offered_with_auto_keep_the_models_penalty(self) -> None:
        """An agent's turn is prose until a call starts (a lazy grammar): the penalty still ends its prose."""
        recommended = RecommendedSampling(Sampling(repetition_penalty=1.1), "card")
        server = scripted_server(Settings(response_cache_size=0), recommended=recommended)
        server.client.post(CHAT, json={**chat_body(), **self.FORCED, "tool_choice": "auto"})
        assert served_sampling(server).repetition_penalty == 1.1
        assert server.engine.requests[-1].grammar is not None

    def test_free_text_keeps_the_models_penalty(self) -> None:
        recommended = RecommendedSampling(Sampling(repetition_penalty=1.1), "card")
        server = scripted_server(Settings(response_cache_size=0), recommended=recommended)
        server.client.post(CHAT, json=chat_body())
        assert served_sampling(server).repetition_penalty == 1.1
