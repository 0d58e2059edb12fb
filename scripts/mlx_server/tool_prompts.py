"""Tools and tool-call history into the chat template's input.

A template that renders ``tools`` and assistant ``tool_calls`` itself (Qwen,
Llama 3.1, Mistral…) gets them as Hugging Face's chat-template convention
defines them.  A template that ignores them (the default SmolLM2's, and any
plain ChatML one) would drop them silently, so the server writes them in the
Hermes form instead: a tool-use block appended to the system prompt, each past
call as ``<tool_call>{…}</tool_call>`` in its assistant message.  Tool results
keep the ``tool`` role either way; they are never folded into user text.  (They
are not wrapped in Hermes's ``<tool_response>`` tags: measured with SmolLM2, the
model then parrots the tags back instead of answering.)

Which of the two applies is found once per tokenizer by rendering a probe
conversation with and without the feature and comparing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from mlx_server.schemas import ChatMessage, ToolDefinition

__all__ = ["TemplateToolSupport", "template_conversation", "template_tool_support", "tool_system_block"]

_PROBE_NAME = "probe_function_7f3a"
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": _PROBE_NAME, "description": "probe", "parameters": {"type": "object", "properties": {}}},
}
_PROBE_CALL = {"id": "call_probe", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}}

TOOL_BLOCK_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query. "
    "Function signatures are given within <tools></tools> XML tags:\n<tools>\n"
)
TOOL_BLOCK_FOOTER = (
    "\n</tools>\n\n"
    "To call a function, reply with a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
    "Each result comes back in a tool message."
)


@dataclass(frozen=True)
class TemplateToolSupport:
    """Whether the chat template renders the ``tools`` list and assistant ``tool_calls`` itself."""

    tools: bool
    tool_calls: bool


def _renders(tokenizer: Any, conversation: list[dict[str, Any]], **extra: Any) -> str:
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False, **extra)
    return rendered if isinstance(rendered, str) else ""


def _detect(tokenizer: Any) -> TemplateToolSupport:
    if not getattr(tokenizer, "has_chat_template", False):
        return TemplateToolSupport(tools=False, tool_calls=False)
    user = [{"role": "user", "content": "hi"}]
    try:
        tools = _PROBE_NAME in _renders(tokenizer, user, tools=[_PROBE_TOOL])
    except (TemplateError, TypeError, ValueError):
        tools = False
    try:
        history: list[dict[str, Any]] = [*user, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}]
        tool_calls = _PROBE_NAME in _renders(tokenizer, history)
    except (TemplateError, TypeError, ValueError):
        tool_calls = False
    return TemplateToolSupport(tools=tools, tool_calls=tool_calls)


@functools.lru_cache(maxsize=8)
def template_tool_support(tokenizer: Any) -> TemplateToolSupport:
    """Found once per tokenizer (a few renders of a tiny conversation)."""
    return _detect(tokenizer)


def tool_system_block(tools: list[ToolDefinition]) -> str:
    """The Hermes tool-use instructions, for templates that cannot render tools."""
    signatures = "\n".join(json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False) for tool in tools)
    return TOOL_BLOCK_HEADER + signatures + TOOL_BLOCK_FOOTER


def _hermes_call(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _template_message(message: ChatMessage, support: TemplateToolSupport) -> dict[str, Any]:
    """The dict a chat template expects; ``developer`` is rendered as ``system``."""
    rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    rendered["content"] = message.text()
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        if support.tool_calls:
            rendered["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.function.name, "arguments": call.function.arguments_object()},
                }
                for call in message.tool_calls
            ]
        else:
            calls = [_hermes_call(call.function.name, call.function.arguments_object()) for call in message.tool_calls]
            rendered["content"] = "\n".join(filter(None, [rendered["content"], *calls]))
    return rendered


def template_conversation(
    tokenizer: Any, messages: list[ChatMessage], tools: list[ToolDefinition] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) as this template should see them; tools are None when they went into the system prompt."""
    support = template_tool_support(tokenizer)
    conversation = [_template_message(message, support) for message in messages]
    if not tools:
        return conversation, None
    if support.tools:
        return conversation, [tool.model_dump(exclude_none=True) for tool in tools]
    block = tool_system_block(tools)
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        conversation[0] = {**first, "content": f"{first['content']}\n\n{block}" if first["content"] else block}
    else:
        conversation.insert(0, {"role": "system", "content": block})
    return conversation, None
