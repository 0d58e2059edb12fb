"""Thinking and effort: every dialect's words reach the model's own controls, read from its chat template.

Against the real tokenizers and templates of each family (Qwen3's
``enable_thinking`` switch, gpt-oss's ``reasoning_effort`` levels, Llama 3
and Gemma 3 with neither) and the scripted engine, which records the prompt
and grammar each request reached it with.  That a budget really ends the
thinking, on a model, is in ``tests/families/test_thinking_budgets.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

import utils_logging
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.prompts import FALLBACK_CHAT_TEMPLATE
from mlx_server.chat.thinking import ThinkingControls, ThinkingPlan, ThinkingRequest, resolve, server_thinking
from mlx_server.settings import Settings
from testbed.tiny_models import FAMILIES
from testbed.tokenizers import load_tokenizer

from .scripted import ScriptedServer, scripted_server

QWEN3 = ThinkingControls(switch="enable_thinking", closable=True)
GPT_OSS = ThinkingControls(levels="reasoning_effort", closable=True)
NEITHER = ThinkingControls()
AUTO = ThinkingRequest()
EMPTY_THINKING = "<think>\n\n</think>\n\n"  # what Qwen3's template writes into the prompt to turn thinking off


def harmony_template() -> str:
    template = FAMILIES["gpt_oss"].template
    assert template is not None
    return template.read_text()


class TestEachFamilysControls:
    @pytest.mark.parametrize(
        ("family", "template", "expected"),
        [
            ("qwen3", None, QWEN3),
            ("gptoss", "harmony", GPT_OSS),
            ("llama3", None, NEITHER),
            ("gemma3", None, NEITHER),
        ],
    )
    def test_read_from_the_template(self, family: str, template: str | None, expected: ThinkingControls) -> None:
        tokenizer = load_tokenizer(family, harmony_template() if template else None)
        assert ModelProfile(tokenizer, 4096).thinking == expected


class TestResolution:
    @pytest.mark.parametrize(
        ("asked", "default", "controls", "expected"),
        [
            # Anthropic's adaptive (nothing said) on a switch: the template's own default.
            (AUTO, AUTO, QWEN3, ThinkingPlan()),
            (ThinkingRequest(enabled=False), AUTO, QWEN3, ThinkingPlan((("enable_thinking", False),))),
            (ThinkingRequest(enabled=True, budget_tokens=64), AUTO, QWEN3,
             ThinkingPlan((("enable_thinking", True),), 64)),
            # On a switch, the least efforts mean off, the others on.
            (ThinkingRequest(effort="none"), AUTO, QWEN3, ThinkingPlan((("enable_thinking", False),))),
            (ThinkingRequest(effort="minimal"), AUTO, QWEN3, ThinkingPlan((("enable_thinking", False),))),
            (ThinkingRequest(effort="low"), AUTO, QWEN3, ThinkingPlan((("enable_thinking", True),))),
            # The server's default fills what the request leaves unsaid, and no more.
            (ThinkingRequest(effort="high"), server_thinking("off", None), QWEN3,
             ThinkingPlan((("enable_thinking", False),))),
            (ThinkingRequest(enabled=True), server_thinking("off", 256), QWEN3,
             ThinkingPlan((("enable_thinking", True),), 256)),
            (ThinkingRequest(enabled=True, budget_tokens=32), server_thinking("auto", 256), QWEN3,
             ThinkingPlan((("enable_thinking", True),), 32)),
            # Off spends no budget.
            (ThinkingRequest(enabled=False, budget_tokens=32), AUTO, QWEN3,
             ThinkingPlan((("enable_thinking", False),))),
            # Levels: efforts land on gpt-oss's low, medium and high; it cannot stop, so off is its lowest.
            (ThinkingRequest(effort="max"), AUTO, GPT_OSS, ThinkingPlan((("reasoning_effort", "high"),))),
            (ThinkingRequest(effort="minimal"), AUTO, GPT_OSS, ThinkingPlan((("reasoning_effort", "low"),))),
            (ThinkingRequest(effort="medium"), server_thinking("high", None), GPT_OSS,
             ThinkingPlan((("reasoning_effort", "medium"),))),
            (ThinkingRequest(enabled=False), AUTO, GPT_OSS,
             ThinkingPlan((("reasoning_effort", "low"),), ignored=("enabled",))),
            (ThinkingRequest(enabled=True), AUTO, GPT_OSS, ThinkingPlan()),
            # No controls: nothing changes, and what was asked is said to be ignored.
            (ThinkingRequest(effort="high", budget_tokens=10), AUTO, NEITHER,
             ThinkingPlan(ignored=("effort", "budget_tokens"))),
            (AUTO, AUTO, NEITHER, ThinkingPlan()),
        ],
    )  # fmt: skip
    def test_the_request_over_the_default_on_the_models_controls(
        self, asked: ThinkingRequest, default: ThinkingRequest, controls: ThinkingControls, expected: ThinkingPlan
    ) -> None:
        assert resolve(asked, default, controls) == expected


@pytest.fixture(scope="module")
def qwen3() -> ScriptedServer:
    return scripted_server()


@pytest.fixture(scope="module")
def gpt_oss() -> ScriptedServer:
    return scripted_server(template=harmony_template())


def prompt_text(server: ScriptedServer) -> str:
    return str(server.engine.tokenizer.decode(server.engine.requests[-1].prompt))


def ask(server: ScriptedServer, path: str, fields: dict[str, Any]) -> None:
    bodies = {
        "/v1/messages": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        "/v1/chat/completions": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        "/v1/responses": {"model": "m", "max_output_tokens": 8, "input": "Hi"},
    }
    response = server.client.post(path, json={**bodies[path], **fields})
    assert response.status_code == 200, response.text


class TestEveryDialectReachesTheSwitch:
    @pytest.mark.parametrize(
        ("path", "fields", "thinks"),
        [
            ("/v1/messages", {}, True),
            ("/v1/messages", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, True),
            ("/v1/messages", {"thinking": {"type": "disabled"}}, False),
            ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 2048}}, True),
            ("/v1/chat/completions", {"reasoning_effort": "none"}, False),
            ("/v1/chat/completions", {"reasoning_effort": "medium"}, True),
            ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": False}}, False),
            ("/v1/responses", {"reasoning": {"effort": "minimal", "summary": "auto"}}, False),
            ("/v1/responses", {"reasoning": {"summary": "auto"}}, True),
        ],
    )
    def test_qwen3s_prompt_follows_the_setting(
        self, qwen3: ScriptedServer, path: str, fields: dict[str, Any], thinks: bool
    ) -> None:
        ask(qwen3, path, fields)
        assert prompt_text(qwen3).endswith("<|im_start|>assistant\n" + ("" if thinks else EMPTY_THINKING))

    @pytest.mark.parametrize(
        ("path", "fields", "level"),
        [
            ("/v1/messages", {"output_config": {"effort": "low"}}, "low"),
            ("/v1/messages", {"thinking": {"type": "disabled"}}, "low"),
            ("/v1/chat/completions", {"reasoning_effort": "high"}, "high"),
            ("/v1/responses", {"reasoning": {"effort": "xhigh"}}, "high"),
            ("/v1/responses", {}, "medium"),
        ],
    )
    def test_gpt_oss_reasons_at_the_level_asked(
        self, gpt_oss: ScriptedServer, path: str, fields: dict[str, Any], level: str
    ) -> None:
        ask(gpt_oss, path, fields)
        assert f"Reasoning: {level}\n" in prompt_text(gpt_oss)

    def test_the_responses_object_says_the_effort_it_was_asked(self, gpt_oss: ScriptedServer) -> None:
        response = gpt_oss.client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4,
                                                              "reasoning": {"effort": "low"}})  # fmt: skip
        assert response.json()["reasoning"]["effort"] == "low"

    @pytest.mark.parametrize(
        ("path", "fields", "param"),
        [
            ("/v1/messages", {"output_config": {"effort": "extreme"}}, "output_config.effort"),
            ("/v1/messages", {"thinking": {"type": "sometimes"}}, "thinking.type"),
            ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 0}}, "thinking.budget_tokens"),
            ("/v1/chat/completions", {"reasoning_effort": "lots"}, "reasoning_effort"),
            ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": "no"}},
             "chat_template_kwargs.enable_thinking"),
            ("/v1/responses", {"reasoning": {"effort": 3}}, "reasoning.effort"),
        ],
    )  # fmt: skip
    def test_a_setting_no_api_has_is_a_400_naming_it(
        self, qwen3: ScriptedServer, path: str, fields: dict[str, Any], param: str
    ) -> None:
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], "input": "Hi"}
        response = qwen3.client.post(path, json={**body, **fields})
        assert response.status_code == 400, response.text
        assert param in response.text


class TestTheServersDefault:
    def test_claude_codes_adaptive_turns_take_the_servers_setting(self) -> None:
        """Claude Code sends adaptive thinking and high effort on every turn: neither says on or off."""
        server = scripted_server(Settings(default_temperature=0.0, response_cache_size=0, thinking="off"))
        ask(server, "/v1/messages", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}})
        assert prompt_text(server).endswith(EMPTY_THINKING)
        ask(server, "/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}})
        assert not prompt_text(server).endswith(EMPTY_THINKING)

    def test_a_budget_puts_a_grammar_on_a_model_that_marks_its_thinking(self) -> None:
        server = scripted_server(Settings(default_temperature=0.0, response_cache_size=0, thinking_budget=64))
        ask(server, "/v1/chat/completions", {})
        assert server.engine.requests[-1].grammar is not None
        ask(server, "/v1/chat/completions", {"reasoning_effort": "none"})  # off: nothing to bound
        assert server.engine.requests[-1].grammar is None


@pytest.fixture
def debug_level_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ANYCLAUDE_DEBUG", "1")
    utils_logging.reload_from_environment()
    yield
    monkeypatch.delenv("ANYCLAUDE_DEBUG")
    utils_logging.reload_from_environment()


@pytest.mark.usefixtures("debug_level_one")
def test_a_model_without_a_switch_says_what_it_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """ChatML without a switch over Qwen3's vocabulary: on/off is ignored, said once; the budget still holds."""
    plain = scripted_server(template=FALLBACK_CHAT_TEMPLATE)
    with caplog.at_level(logging.DEBUG):
        ask(plain, "/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 100}})
    (line,) = [record.getMessage() for record in caplog.records if "no control for" in record.getMessage()]
    assert '"ignored":{"enabled":true}' in line and '"model_controls":"budgets"' in line
    assert plain.engine.requests[-1].grammar is not None
