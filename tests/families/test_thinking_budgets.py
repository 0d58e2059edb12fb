"""Thinking on the tiny Qwen3 model: a budget closes it, off leaves it out, and the prompt cache stays exact.

The model's template is Qwen3's with the thinking block opened in the prompt
(as Qwen3's thinking-only releases, QwQ and DeepSeek-R1 do), so the output
starts inside it; a random-weight model then thinks until it is stopped,
since it almost never writes ``</think>`` itself.  Only a budget ends it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mlx_server.model.loading import load_model
from testbed.serving import serve

pytestmark = pytest.mark.e2e

QWEN3_OPENING = "{{- '<|im_start|>assistant\\n' }}"
THINKING_OPENED = (
    QWEN3_OPENING + "{%- if enable_thinking is not defined or enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
)
MAX_TOKENS = 40
BUDGET = 12
# Counting the reply's thought again re-encodes its text: the first word, written as " manner" and shown
# without the space the reply trims, encodes as two tokens ("m", "anner").
RE_ENCODING_SLACK = 1


@pytest.fixture(scope="module")
def thinker(model_directories: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3 model whose template opens the thinking block unless thinking is off."""
    directory = tmp_path_factory.mktemp("thinker") / "qwen3-thinking"
    shutil.copytree(model_directories["qwen3"], directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert QWEN3_OPENING in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace(QWEN3_OPENING, THINKING_OPENED)
    config_path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def served(thinker: Path) -> Iterator[tuple[TestClient, TestClient, Any]]:
    """The model with its prompt cache, without, and its tokenizer."""
    loaded = load_model(str(thinker))
    engine, client = serve(loaded, 32)
    uncached_engine, uncached = serve(loaded, 0)
    yield client, uncached, loaded.tokenizer
    engine.shutdown()
    uncached_engine.shutdown()


def messages_reply(
    client: TestClient, thinking: dict[str, Any] | None, content: str = "Plan a trip."
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": content}],
    }
    if thinking:
        body["thinking"] = thinking
    response = client.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def thinking_tokens(reply: dict[str, Any], tokenizer: Any) -> int:
    thought = "".join(block["thinking"] for block in reply["content"] if block["type"] == "thinking")
    return len(tokenizer.encode(thought, add_special_tokens=False)) if thought else 0


def test_unbounded_thinking_runs_to_the_token_limit(served: tuple[TestClient, TestClient, Any]) -> None:
    """What the budget is measured against: the same request with thinking on and no budget."""
    client, _, tokenizer = served
    reply = messages_reply(client, {"type": "adaptive"})
    assert reply["stop_reason"] == "max_tokens"
    assert thinking_tokens(reply, tokenizer) > BUDGET * 2


def test_a_budget_closes_the_thinking_and_the_answer_follows(served: tuple[TestClient, TestClient, Any]) -> None:
    client, _, tokenizer = served
    reply = messages_reply(client, {"type": "enabled", "budget_tokens": BUDGET})
    assert 0 < thinking_tokens(reply, tokenizer) <= BUDGET + RE_ENCODING_SLACK
    assert reply["content"][0]["type"] == "thinking"
    assert any(block["type"] == "text" and block["text"] for block in reply["content"])


def test_disabled_thinking_is_not_opened(served: tuple[TestClient, TestClient, Any]) -> None:
    client, _, tokenizer = served
    reply = messages_reply(client, {"type": "disabled"})
    assert thinking_tokens(reply, tokenizer) == 0
    assert reply["usage"]["output_tokens"] > 0


def test_turns_with_different_settings_read_the_cache_and_equal_the_uncached_answers(
    served: tuple[TestClient, TestClient, Any],
) -> None:
    client, uncached, _ = served
    history: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = [{"type": "disabled"}, {"type": "enabled", "budget_tokens": 8},
                                      {"type": "disabled"}, {"type": "adaptive"}]  # fmt: skip
    for turn, thinking in enumerate(settings):
        history.append({"role": "user", "content": f"Step {turn}: go on."})
        body = {"model": "tiny", "max_tokens": 16, "messages": history, "thinking": thinking}
        cached, fresh = (server.post("/v1/messages", json=body).json() for server in (client, uncached))
        assert cached["content"] == fresh["content"]
        if turn:
            assert cached["usage"]["cache_read_input_tokens"] > 0
        text = "".join(block.get("text", "") for block in cached["content"]) or "ok"
        history.append({"role": "assistant", "content": text})
