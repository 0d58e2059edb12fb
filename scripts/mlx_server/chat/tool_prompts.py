"""Tools and tool-call history into the chat template's input.

A template that renders ``tools`` and assistant ``tool_calls`` itself (Qwen,
Llama 3.1, Mistral…) gets them as Hugging Face's chat-template convention
defines them.  A template that ignores them (the default SmolLM2's, and any
plain ChatML one) would drop them silently, so the server writes them in the
Hermes form instead: a tool-use block appended to the system prompt, each past
call as ``<tool_call>{…}</tool_call>`` in its assistant message.  Tool results
keep the ``tool`` role wherever the template renders it.  (They are not wrapped
in Hermes's ``<tool_response>`` tags: measured with SmolLM2, the model then
parrots the tags back instead of answering.)  A template that refuses or drops
the ``tool`` role (Gemma 3's accepts only alternating user and model turns) gets
each result as user text in ``<tool_response>`` tags, and adjacent messages of
one role joined, since an agent's session cannot go on without its results.

Which of the two applies is found by rendering a probe conversation with
and without the feature and comparing: once per model, in its profile
(``chat.profile``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from mlx_server.vocabulary import CUSTOM_TOOL, Message, Tool, ToolCall

__all__ = [
    "TemplateToolSupport",
    "arguments_object",
    "hermes_call_text",
    "template_conversation",
    "template_tool",
    "template_tool_support",
    "tool_system_block",
]

_PROBE_NAME = "probe_function_7f3a"
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": _PROBE_NAME, "description": "probe", "parameters": {"type": "object", "properties": {}}},
}
_PROBE_RESULT = "probe_result_5b21"
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
CUSTOM_TOOL_FOOTER = (
    "\nA tool of type custom takes plain text instead of JSON arguments: write its name, then the text on the "
    'next lines:\n<tool_call>\n{"name": <tool-name>}\n<text>\n</tool_call>'
)


@dataclass(frozen=True)
class TemplateToolSupport:
    """Whether the chat template renders the ``tools`` list and assistant ``tool_calls`` itself."""

    tools: bool
    tool_calls: bool
    tool_results: bool = True  # it renders messages of the ``tool`` role


def _renders(tokenizer: Any, conversation: list[dict[str, Any]], **extra: Any) -> str:
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False, **extra)
    return rendered if isinstance(rendered, str) else ""


def template_tool_support(tokenizer: Any) -> TemplateToolSupport:
    """Whether the template renders tools and calls itself (a few renders of a tiny conversation)."""
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
    try:
        answered = [*user, {"role": "assistant", "content": "calling"},
                    {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "call_probe"}]  # fmt: skip
        tool_results = _PROBE_RESULT in _renders(tokenizer, answered)
    except (TemplateError, TypeError, ValueError):
        tool_results = False
    return TemplateToolSupport(tools=tools, tool_calls=tool_calls, tool_results=tool_results)


def template_tool(tool: Tool) -> dict[str, Any]:
    """The Hugging Face chat-template convention for one tool."""
    if tool.kind == CUSTOM_TOOL:
        custom: dict[str, Any] = {"type": "custom", "name": tool.name}
        if tool.description:
            custom["description"] = tool.description
        if tool.grammar is not None:
            custom["format"] = {"syntax": tool.grammar.syntax, "definition": tool.grammar.definition}
        return custom
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters_schema()
    return {"type": "function", "function": function}


def tool_system_block(tools: Sequence[Tool]) -> str:
    """The Hermes tool-use instructions, for templates that cannot render tools."""
    signatures = "\n".join(json.dumps(template_tool(tool), ensure_ascii=False) for tool in tools)
    footer = TOOL_BLOCK_FOOTER + (CUSTOM_TOOL_FOOTER if any(tool.kind == CUSTOM_TOOL for tool in tools) else "")
    return TOOL_BLOCK_HEADER + signatures + footer


def arguments_object(arguments: str) -> Any:
    """Arguments decoded, for chat templates that render them as JSON; undecodable text stays text."""
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return arguments


def hermes_call_text(call: ToolCall) -> str:
    """A past call as the model is asked to write one (functions as JSON, custom tools as a header and text)."""
    if call.kind == CUSTOM_TOOL:
        header = json.dumps({"name": call.name}, ensure_ascii=False)
        return f"<tool_call>\n{header}\n{call.arguments}\n</tool_call>"
    body = json.dumps({"name": call.name, "arguments": arguments_object(call.arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _template_call(call: ToolCall) -> dict[str, Any]:
    arguments = {"input": call.arguments} if call.kind == CUSTOM_TOOL else arguments_object(call.arguments)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _template_message(message: Message, support: TemplateToolSupport) -> dict[str, Any]:
    """The dict a chat template expects."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.reasoning:
        rendered["reasoning_content"] = message.reasoning
    if message.tool_calls:
        if support.tool_calls:
            rendered["tool_calls"] = [_template_call(call) for call in message.tool_calls]
        else:
            calls = [hermes_call_text(call) for call in message.tool_calls]
            rendered["content"] = "\n".join(filter(None, [rendered["content"], *calls]))
    return rendered


def _alternating(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results as user text, and adjacent messages of one role joined: for templates without a tool role."""
    joined: list[dict[str, Any]] = []
    for message in conversation:
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        if joined and joined[-1]["role"] == message["role"]:
            previous = joined[-1]
            joined[-1] = {**previous, "content": "\n\n".join(filter(None, [previous["content"], message["content"]]))}
        else:
            joined.append(message)
    return joined


def template_conversation(
    support: TemplateToolSupport, messages: Sequence[Message], tools: Sequence[Tool] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) as a template with this support should see them; tools are None when they went into
    the system prompt."""
    conversation = [_template_message(message, support) for message in messages]
    if not support.tool_results:
        conversation = _alternating(conversation)
    if not tools:
        return conversation, None
    if support.tools:
        return conversation, [template_tool(tool) for tool in tools]
    block = tool_system_block(tools)
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        conversation[0] = {**first, "content": f"{first['content']}\n\n{block}" if first["content"] else block}
    else:
        conversation.insert(0, {"role": "system", "content": block})
    return conversation, None
