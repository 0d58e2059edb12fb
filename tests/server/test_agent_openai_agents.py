"""End to end: openai-agents (pinned) with its default model, the Responses API, and a function tool.

The agent is pointed at the server with ``set_default_openai_client``, with
tracing off (nothing leaves 127.0.0.1).  The 135M model cannot decide to call
a tool on its own, so the first agent forces the call (``tool_choice``
required) and stops on it; a second agent, with calls ruled out, answers from
the tool's output, which the SDK sends back as a ``function_call_output`` item.
"""

from __future__ import annotations

import json

import pytest
from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI

from .conftest import RunningServer
from .helpers import WEATHER_QUESTION, WEATHER_RESULT

pytestmark = pytest.mark.e2e

CITIES: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    CITIES.append(city)
    return WEATHER_RESULT


@pytest.fixture(scope="module")
def agents_client(server: RunningServer) -> None:
    set_tracing_disabled(True)
    set_default_openai_client(
        AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0), use_for_tracing=False
    )


def test_a_function_tool_round_trip(agents_client: None, server: RunningServer) -> None:
    caller = Agent(
        name="weather",
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
    )
    first = Runner.run_sync(caller, WEATHER_QUESTION)
    assert [type(item) for item in first.new_items] == [ToolCallItem, ToolCallOutputItem]
    assert len(CITIES) == 1 and CITIES[0]
    assert json.loads(first.final_output) == json.loads(WEATHER_RESULT)

    answerer = Agent(
        name="weather",
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="none", temperature=0, max_tokens=40),
    )
    second = Runner.run_sync(answerer, first.to_input_list())
    assert [type(item) for item in second.new_items] == [MessageOutputItem]
    assert isinstance(second.final_output, str) and second.final_output
    assert server.log_text().count("POST /v1/responses HTTP/1.1") >= 2
