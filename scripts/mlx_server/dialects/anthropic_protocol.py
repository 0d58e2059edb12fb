"""Anthropic Messages API requests, validated by pydantic and translated into the core's ``ChatRequest``.

The shape is what Claude Code sends (see the README): ``system`` as a string
or text blocks, content as a string or blocks (``text``, ``tool_use``,
``tool_result``, ``thinking``, ``redacted_thinking``), ``role: "system"``
messages in the middle of a conversation, ``tools`` with ``input_schema``.
``cache_control`` markers, ``thinking``, ``context_management``,
``output_config``, ``metadata`` and other options are accepted and ignored:
the prefix cache needs no markers, and rendering never sees them, so a marker
that moves every turn does not change the prompt.  Image and document blocks
are a 400 naming the block: the models served here read text.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from mlx_server.chat.request import ChatRequest
from mlx_server.dialects.common import DialectModel, RequestBody
from mlx_server.dialects.validation import Finite, unique_tool_names
from mlx_server.vocabulary import Lane, Message, Sampling, Tool, ToolCall, ToolChoice, UnsupportedOptionError
from utils_logging import debug

__all__ = ["CountTokensRequest", "MessagesRequest", "anthropic_tool_id"]


def join_text(texts: list[str]) -> str:
    """Text blocks as one string: a newline between blocks unless one already ends in whitespace."""
    joined = ""
    for text in texts:
        joined += text if not joined or joined[-1].isspace() else "\n" + text
    return joined


def anthropic_tool_id(call_id: str) -> str:
    """Anthropic's ``toolu_`` id for a call id of the core."""
    return "toolu_" + call_id.removeprefix("call_")


class TextBlock(DialectModel):
    type: Literal["text"]
    text: str


class _Unreadable(DialectModel):
    """A block this server cannot pass to a text model; refused with a message that names it."""

    @model_validator(mode="after")
    def _refuse(self) -> _Unreadable:
        kind = getattr(self, "type", "this")
        raise ValueError(f"{kind} blocks are not supported: the model served here reads text only")


class ImageBlock(_Unreadable):
    type: Literal["image"]


class DocumentBlock(_Unreadable):
    type: Literal["document"]


class ToolUseBlock(DialectModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(DialectModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else join_text([block.text for block in self.content])  # type: ignore[union-attr]
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(DialectModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(DialectModel):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock, ImageBlock, DocumentBlock],
    Field(discriminator="type"),
]


class AnthropicMessage(DialectModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]

    def to_messages(self) -> list[Message]:
        """One message, or several: each tool result becomes a ``tool`` message, in order."""
        if isinstance(self.content, str):
            return [Message(self.role, self.content)]
        messages: list[Message] = []
        texts: list[str] = []
        calls: list[ToolCall] = []
        reasoning: list[str] = []
        for block in self.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
            elif isinstance(block, ThinkingBlock):
                reasoning.append(block.thinking)
            elif isinstance(block, ToolResultBlock):
                if texts:  # text before a result stays before it
                    messages.append(Message(self.role, join_text(texts)))
                    texts = []
                messages.append(Message("tool", block.text(), tool_call_id=block.tool_use_id))
        if texts or calls or not messages:
            messages.append(Message(self.role, join_text(texts), tuple(calls), reasoning="".join(reasoning) or None))
        return messages


class AnthropicTool(DialectModel):
    """A client tool; server tools (``type`` other than ``custom``) are left out of the prompt."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None

    def is_client_tool(self) -> bool:
        return self.type in (None, "custom")


class AnthropicToolChoice(DialectModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_for_tool(self) -> AnthropicToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs a 'name'")
        return self


class _MessagesBody(RequestBody):
    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None

    def _system_text(self) -> str:
        if self.system is None:
            return ""
        return self.system if isinstance(self.system, str) else join_text([block.text for block in self.system])

    def _tools(self) -> tuple[Tool, ...]:
        offered = []
        for tool in self.tools or ():
            if not tool.is_client_tool():
                debug(1, "Left out a server tool this server cannot run", {"name": tool.name, "type": tool.type})
                continue
            offered.append(Tool(tool.name, tool.description, tool.input_schema))
        return tuple(offered)

    def _messages(self) -> tuple[Message, ...]:
        system = self._system_text()
        messages = [Message("system", system)] if system else []
        for message in self.messages:
            messages += message.to_messages()
        return tuple(messages)

    def _tool_choice(self, tools: tuple[Tool, ...]) -> tuple[ToolChoice, bool]:
        choice = self.tool_choice
        if choice is None:
            return ToolChoice("auto"), True
        names = [tool.name for tool in tools]
        if choice.type in ("any", "tool") and not names:
            raise UnsupportedOptionError("tool_choice", f"tool_choice {choice.type!r} needs a non-empty 'tools' list")
        if choice.type == "tool" and choice.name not in names:
            raise UnsupportedOptionError(
                "tool_choice.name",
                f"tool_choice names {choice.name!r}, which is not among the tools: {', '.join(names)}",
            )
        parallel = not choice.disable_parallel_tool_use
        if choice.type == "none":
            return ToolChoice("none"), parallel
        if choice.type == "auto":
            return ToolChoice("auto"), parallel
        return ToolChoice("required", choice.name if choice.type == "tool" else None), parallel

    def chat_request(self, max_tokens: int | None, sampling: Sampling, lane: Lane | None = None) -> ChatRequest:
        unique_tool_names(tool.name for tool in self.tools or ())
        tools = self._tools()
        choice, parallel = self._tool_choice(tools)
        return ChatRequest(
            messages=self._messages(),
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=parallel,
            sampling=sampling,
            max_tokens=max_tokens,
            length_policy="ceiling",
            lane=lane,
            tool_params=tuple(
                f"tools[{index}].input_schema" for index, tool in enumerate(self.tools or ()) if tool.is_client_tool()
            ),
        )


class MessagesRequest(_MessagesBody):
    """POST /v1/messages."""

    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    temperature: Annotated[Finite, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None

    def to_chat_request(self, lane: Lane | None = None) -> ChatRequest:
        sampling = Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(self.stop_sequences or ()),
        )
        return self.chat_request(self.max_tokens, sampling, lane)


class CountTokensRequest(_MessagesBody):
    """POST /v1/messages/count_tokens: the same body without ``max_tokens``."""

    def to_chat_request(self) -> ChatRequest:
        return self.chat_request(None, Sampling())
