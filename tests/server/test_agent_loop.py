"""The agent loop end to end: each real agent CLI runs a tool the model called, and answers from its result.

The 135M default model never calls a tool, so the model here is the scripted
engine, served over real HTTP by the real application: asked about a file, it
answers with a call in the loaded tokenizer's own format (Qwen3's: a Hermes
``<tool_call>`` block); the chat core parses it as it is written, and the
CLI reads its arguments streamed in its dialect's own pieces; the CLI runs its tool (Claude
Code's Read, Codex's exec_command, OpenCode's read) on a file in its work
directory; the tool's result comes back in the next request, rendered into
the prompt by the chat template (asserted on the prompt the engine received);
and the CLI prints the scripted final answer.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mlx_server.chat.attachments import IMAGE_PLACEHOLDER
from mlx_server.chat.call_formats import HERMES
from mlx_server.chat.tool_prompts import hermes_call_text
from mlx_server.settings import Settings
from mlx_server.vocabulary import GenerationRequest, ToolCall
from testbed.documents import png

from .conftest import ROOT, run_agent_cli
from .scripted import ScriptedServer, scripted_server, served_over_http

pytestmark = pytest.mark.e2e

CLIS = ROOT / "tools" / "agent-clis" / "node_modules" / ".bin"
CLI_TIMEOUT_SECONDS = 300
MARKER = "MARKER-4817"
QUESTION = "What does notes.txt say?"
ANSWER = f"The note says {MARKER}."


@dataclass
class AgentLoop:
    """The scripted model's side of one round trip: call ``tool`` when asked about the file, answer from its result."""

    tool: str
    arguments: dict[str, Any]
    prompts: list[str] = field(default_factory=list)

    def respond(self, request: GenerationRequest, prompt: str) -> str | None:
        self.prompts.append(prompt)
        if MARKER in prompt:  # the tool's result is in the prompt: the final answer
            return ANSWER
        if QUESTION in prompt:
            return hermes_call_text(ToolCall("call_1", self.tool, json.dumps(self.arguments)))
        return None  # a side request: the default reply

    def prompt_with_the_result(self) -> str:
        answered = [prompt for prompt in self.prompts if MARKER in prompt]
        assert answered, "no request carried the tool's result"
        return answered[0]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text(f"{MARKER} is in this file.\n")
    return tmp_path


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedServer, str]]:
    """The scripted model (Qwen3's tokenizer, a context that holds OpenCode's prompt) on a real port."""
    server = scripted_server(Settings(response_cache_size=0), context_length=65536)
    assert server.service.profile.call_format is HERMES  # the format the replies use
    with served_over_http(server) as base_url:
        yield server, base_url


def assert_the_result_was_rendered(loop: AgentLoop, tool: str) -> None:
    """The prompt holds the call as the model wrote it and, after it, the tool's output as Qwen3's template puts it."""
    prompt = loop.prompt_with_the_result()
    call = prompt.rindex(f'"name": "{tool}"')
    response = prompt.index("<tool_response>", call)
    assert prompt.index(MARKER, response) < prompt.index("</tool_response>", response)


def test_claude_code_reads_a_file_the_model_asked_for(scripted: tuple[ScriptedServer, str], workspace: Path) -> None:
    server, base_url = scripted
    loop = AgentLoop("Read", {"file_path": str(workspace / "notes.txt")})
    server.engine.respond_with(loop.respond)
    environment = {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-local-test",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    arguments = ["-p", QUESTION, "--output-format", "json", "--bare", "--tools", "Read", "--model", "local-model"]
    stdout = run_agent_cli(CLIS / "claude", arguments, workspace, workspace / "home", environment, CLI_TIMEOUT_SECONDS)
    result = json.loads(stdout[stdout.index("{") :])
    assert result["is_error"] is False and result["num_turns"] == 2
    assert result["result"] == ANSWER
    assert_the_result_was_rendered(loop, "Read")


def test_codex_runs_a_command_the_model_asked_for(scripted: tuple[ScriptedServer, str], workspace: Path) -> None:
    server, base_url = scripted
    loop = AgentLoop("exec_command", {"cmd": "cat notes.txt"})
    server.engine.respond_with(loop.respond)
    home = workspace / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model_provider = "local"\nmodel = "local-model"\n[model_providers.local]\nname = "Local MLX server"\n'
        f'base_url = "{base_url}/v1"\nwire_api = "responses"\nenv_key = "OPENAI_API_KEY"\n'
    )
    options = ["--disable", "plugins", "--disable", "multi_agent", "--disable", "goals", "-c", "web_search=disabled"]
    arguments = ["exec", "--json", "--skip-git-repo-check", *options, QUESTION]
    environment = {"CODEX_HOME": str(home), "OPENAI_API_KEY": "sk-local-test"}
    stdout = run_agent_cli(CLIS / "codex", arguments, workspace, home, environment, CLI_TIMEOUT_SECONDS)
    items = [json.loads(line)["item"] for line in stdout.splitlines() if '"item.completed"' in line]
    (command,) = [item for item in items if item["type"] == "command_execution"]
    assert command["exit_code"] == 0 and MARKER in command["aggregated_output"]
    assert [item["text"] for item in items if item["type"] == "agent_message"] == [ANSWER]
    assert_the_result_was_rendered(loop, "exec_command")


def test_opencode_reads_a_file_the_model_asked_for(scripted: tuple[ScriptedServer, str], workspace: Path) -> None:
    server, base_url = scripted
    loop = AgentLoop("read", {"filePath": str(workspace / "notes.txt")})
    server.engine.respond_with(loop.respond)
    config = {
        "provider": {
            "local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Local MLX server",
                "options": {"baseURL": f"{base_url}/v1", "apiKey": "sk-local-test"},
                "models": {"default": {"name": "default"}},
            }
        },
        "model": "local/default",
        "autoupdate": False,
        "share": "disabled",
    }
    offline = {name: "1" for name in ("OPENCODE_DISABLE_MODELS_FETCH", "OPENCODE_DISABLE_AUTOUPDATE",
               "OPENCODE_DISABLE_DEFAULT_PLUGINS", "OPENCODE_DISABLE_LSP_DOWNLOAD", "OPENCODE_DISABLE_SHARE",
               "OPENCODE_DISABLE_CLAUDE_CODE")}  # fmt: skip
    environment = {"OPENCODE_CONFIG_CONTENT": json.dumps(config), **offline}
    arguments = ["run", "--format", "json", "--title", "e2e", QUESTION]
    stdout = run_agent_cli(CLIS / "opencode", arguments, workspace, workspace / "home", environment, 600)
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    (tool,) = [event["part"] for event in events if event["type"] == "tool_use"]
    assert tool["tool"] == "read" and tool["state"]["status"] == "completed" and MARKER in tool["state"]["output"]
    assert [event["part"]["text"] for event in events if event["type"] == "text"] == [ANSWER]
    assert_the_result_was_rendered(loop, "read")


def test_claude_codes_screenshot_leaves_a_placeholder_on_a_text_model(
    scripted: tuple[ScriptedServer, str], workspace: Path
) -> None:
    """A user message with an image (stream-json input): the session answers, the image left out in its place."""
    server, base_url = scripted
    prompts: list[str] = []

    def answer(_request: GenerationRequest, prompt: str) -> str:
        prompts.append(prompt)
        return ANSWER

    server.engine.respond_with(answer)
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png()).decode()}
    message = {"type": "user", "message": {"role": "user", "content": [
        {"type": "image", "source": image}, {"type": "text", "text": "What does this screenshot show?"}]}}  # fmt: skip
    environment = {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-local-test", "DISABLE_TELEMETRY": "1",
                   "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}  # fmt: skip
    arguments = ["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose", "--bare",
                 "--tools", "Read", "--model", "local-model"]  # fmt: skip
    stdout = run_agent_cli(CLIS / "claude", arguments, workspace, workspace / "home", environment,
                           CLI_TIMEOUT_SECONDS, stdin=json.dumps(message) + "\n")  # fmt: skip
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["is_error"] is False and result["result"] == ANSWER
    (asked,) = [prompt for prompt in prompts if "What does this screenshot show?" in prompt]
    assert asked.index(IMAGE_PLACEHOLDER) < asked.index("What does this screenshot show?")
