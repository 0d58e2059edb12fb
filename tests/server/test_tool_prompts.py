"""Tools and tool-call history reach the model, whether or not its chat template knows about them."""

from __future__ import annotations

from typing import Any

import pytest

from mlx_server.chat.prompts import FALLBACK_CHAT_TEMPLATE, ChatTemplate
from mlx_server.chat.tool_prompts import TemplateToolSupport, template_conversation, template_tool_support
from mlx_server.vocabulary import Message, Tool, ToolCall
from testbed.tokenizers import load_tokenizer

TOOLS = (Tool("read_file", "Read a file", {"type": "object", "properties": {"path": {"type": "string"}}}),)
LOOP = [
    Message("system", "You are a coding agent."),
    Message("user", "Show me setup.cfg"),
    Message("assistant", "", (ToolCall("call_1", "read_file", '{"path": "setup.cfg"}'),)),
    Message("tool", "[metadata]\nname = demo", tool_call_id="call_1"),
]


@pytest.fixture(scope="module")
def chatml() -> Any:
    """A tokenizer whose template is plain ChatML, as SmolLM2's: it renders neither tools nor calls."""
    return load_tokenizer("qwen3", FALLBACK_CHAT_TEMPLATE)


def rendered(tokenizer: Any, messages: list[Message], tools: tuple[Tool, ...] = TOOLS) -> str:
    return str(tokenizer.decode(ChatTemplate(tokenizer).tokens(messages, tools)))


def test_a_plain_chatml_template_renders_neither_tools_nor_calls(chatml: Any) -> None:
    assert template_tool_support(chatml) == TemplateToolSupport(tools=False, tool_calls=False)


def test_tools_are_injected_into_the_system_prompt(chatml: Any) -> None:
    text = rendered(chatml, LOOP[:2])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a coding agent.")
    assert '"name": "read_file"' in system and "<tool_call>" in system


def test_tools_get_their_own_system_message_when_there_is_none(chatml: Any) -> None:
    conversation, template_tools = template_conversation(template_tool_support(chatml), LOOP[1:2], TOOLS)
    assert template_tools is None
    assert [message["role"] for message in conversation] == ["system", "user"]
    assert "read_file" in conversation[0]["content"]


def test_history_keeps_calls_and_tool_results_in_their_roles(chatml: Any) -> None:
    """The assistant's call is rendered as a Hermes call; the result stays a tool message, not user text."""
    text = rendered(chatml, LOOP)
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "read_file", "arguments": {"path": "setup.cfg"}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>tool\n[metadata]\nname = demo<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_stable_prefix_covers_system_prompt_and_tools(chatml: Any) -> None:
    """The prompt cache's checkpoint includes the tool block, so every turn of a tool loop reuses it."""
    tokenizer = chatml
    template = ChatTemplate(tokenizer)
    prompt = template.tokens(LOOP, TOOLS)
    prefix = template.stable_prefix_length(LOOP, prompt, TOOLS)
    assert prefix > 0
    assert "read_file" in tokenizer.decode(prompt[:prefix])
    assert "Show me" not in tokenizer.decode(prompt[:prefix])


# A Qwen 2.5-style template that renders tools and calls itself (abridged from Qwen's).
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif not (message.role == 'system' and tools) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_a_template_with_tool_support_renders_them_itself() -> None:
    """Tools go to the template as ``tools=``; past calls carry their arguments as an object, not a string."""
    tokenizer = load_tokenizer("qwen3", QWEN_STYLE_TEMPLATE)
    assert template_tool_support(tokenizer) == TemplateToolSupport(tools=True, tool_calls=True)
    text = tokenizer.decode(ChatTemplate(tokenizer).tokens(LOOP, TOOLS))
    assert "You may call one or more functions" not in text, "nothing injected"
    assert '<tools>{"type": "function", "function": {"name": "read_file"' in text
    assert '"arguments": {"path": "setup.cfg"}}' in text
    assert "<|im_start|>tool\n[metadata]" in text


@pytest.fixture(scope="module")
def gemma() -> Any:
    return load_tokenizer("gemma3")


class TestATemplateWithoutAToolRole:
    """Gemma 3's template accepts only alternating user and model turns: results come as user text."""

    def test_its_support_says_so(self, gemma: Any) -> None:
        assert template_tool_support(gemma).tool_results is False

    def test_an_agents_loop_renders_with_each_result_in_a_user_turn(self, gemma: Any) -> None:
        loop = [*LOOP, Message("user", "Now explain it.")]
        text = rendered(gemma, loop)
        result = text.index("<tool_response>\n[metadata]\nname = demo\n</tool_response>")
        assert text.rindex("<start_of_turn>user", 0, result) > text.index("setup.cfg")
        assert text.index("Now explain it.") > result
        assert text.count("<start_of_turn>user") == 2  # the result and the next message joined in one turn

    def test_a_template_with_a_tool_role_keeps_it(self, chatml: Any) -> None:
        assert template_tool_support(chatml).tool_results is True
        assert "<tool_response>" not in rendered(chatml, LOOP)
