"""Anthropic Messages API requests, validated by pydantic and translated into the core's ``ChatRequest``.

The shape is what Claude Code sends (see the README): ``system`` as a string
or text blocks, content as a string or blocks (``text``, ``tool_use``,
``tool_result``, ``thinking``, ``redacted_thinking``), ``role: "system"``
messages in the middle of a conversation, ``tools`` with ``input_schema``,
``thinking`` and ``output_config.effort`` (onto the model's own controls).
``cache_control`` markers, ``context_management``, the rest of
``output_config``, ``metadata`` and other options are accepted and ignored:
the prefix cache needs no markers, and rendering never sees them, so a marker
that moves every turn does not change the prompt.  Image and document blocks
(base64, text, content or URL sources), in messages and in tool results,
become the core's parts: the chat core decides what the model can read.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from mlx_server.chat.request import ChatRequest
from mlx_server.chat.thinking import ThinkingRequest
from mlx_server.dialects.attachments import decode_base64
from mlx_server.dialects.common import DialectModel, RequestBody
from mlx_server.dialects.validation import Finite, unique_tool_names
from mlx_server.vocabulary import (
    DocumentPart,
    Effort,
    ImagePart,
    Lane,
    Message,
    Part,
    Sampling,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    UnsupportedOptionError,
)
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


class Base64Source(DialectModel):
    type: Literal["base64"]
    media_type: str
    data: str

    def decoded(self) -> bytes:
        return decode_base64(self.data)


class UrlSource(DialectModel):
    type: Literal["url"]
    url: str


class TextSource(DialectModel):
    type: Literal["text"]
    data: str
    media_type: str = "text/plain"


class ImageBlock(DialectModel):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]

    @model_validator(mode="after")
    def _decodable(self) -> ImageBlock:
        if isinstance(self.source, Base64Source):
            self.source.decoded()
        return self

    def part(self) -> ImagePart:
        if isinstance(self.source, UrlSource):
            return ImagePart(url=self.source.url)
        return ImagePart(data=self.source.decoded(), media_type=self.source.media_type)


class ContentSource(DialectModel):
    type: Literal["content"]
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]]


class DocumentBlock(DialectModel):
    type: Literal["document"]
    source: Annotated[Base64Source | TextSource | ContentSource | UrlSource, Field(discriminator="type")]
    title: str | None = None

    @model_validator(mode="after")
    def _decodable(self) -> DocumentBlock:
        if isinstance(self.source, Base64Source):
            self.source.decoded()
        return self

    def parts(self) -> list[Part]:
        source = self.source
        if isinstance(source, Base64Source):
            return [DocumentPart(data=source.decoded(), media_type=source.media_type, title=self.title)]
        if isinstance(source, TextSource):
            return [DocumentPart(text=source.data, media_type=source.media_type, title=self.title)]
        if isinstance(source, UrlSource):
            return [DocumentPart(url=source.url, title=self.title)]
        if isinstance(source.content, str):
            return [DocumentPart(text=source.content, title=self.title)]
        return [_part_of(block) for block in source.content]


def _part_of(block: TextBlock | ImageBlock) -> Part:
    return TextPart(block.text) if isinstance(block, TextBlock) else block.part()


def _parts_or_text(parts: list[Part]) -> tuple[str, tuple[Part, ...]]:
    """A message's content: its text when it is all text, else its parts in order."""
    if all(isinstance(part, TextPart) for part in parts):
        return join_text([part.text for part in parts if isinstance(part, TextPart)]), ()
    return "", tuple(parts)


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

    def message(self) -> Message:
        """The result as a ``tool`` message: its text, or its parts (Claude Code's Read returns images here)."""
        blocks = [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content
        parts: list[Part] = []
        for block in blocks:
            parts += block.parts() if isinstance(block, DocumentBlock) else [_part_of(block)]
        text, structured = _parts_or_text(parts)
        if self.is_error:
            text, structured = (
                ("Error: " + text, structured) if not structured else ("", (TextPart("Error:"), *structured))
            )
        return Message("tool", text, tool_call_id=self.tool_use_id, parts=structured)


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
        parts: list[Part] = []
        calls: list[ToolCall] = []
        reasoning: list[str] = []
        for block in self.content:
            if isinstance(block, (TextBlock, ImageBlock)):
                parts.append(_part_of(block))
            elif isinstance(block, DocumentBlock):
                parts += block.parts()
            elif isinstance(block, ToolUseBlock):
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
            elif isinstance(block, ThinkingBlock):
                reasoning.append(block.thinking)
            elif isinstance(block, ToolResultBlock):
                if parts:  # what came before a result stays before it
                    text, structured = _parts_or_text(parts)
                    messages.append(Message(self.role, text, parts=structured))
                    parts = []
                messages.append(block.message())
        if parts or calls or not messages:
            text, structured = _parts_or_text(parts)
            messages.append(Message(self.role, text, tuple(calls), reasoning="".join(reasoning) or None,
                                    parts=structured))  # fmt: skip
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


class ThinkingConfig(DialectModel):
    """``thinking``: ``enabled`` (with ``budget_tokens``), ``disabled``, or ``adaptive`` (the model decides)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class OutputConfig(DialectModel):
    """``output_config``: its ``effort`` (other fields are accepted and ignored)."""

    effort: Effort | None = None


class _MessagesBody(RequestBody):
    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None

    def _thinking(self) -> ThinkingRequest:
        """``thinking`` and ``output_config.effort`` in the core's words (``adaptive`` leaves on/off unsaid)."""
        effort = self.output_config.effort if self.output_config is not None else None
        config = self.thinking
        if config is None or config.type == "adaptive":
            return ThinkingRequest(effort=effort, param="output_config.effort" if effort else "thinking")
        if config.type == "disabled":
            return ThinkingRequest(enabled=False, effort=effort)
        return ThinkingRequest(enabled=True, budget_tokens=config.budget_tokens, effort=effort)

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
            thinking=self._thinking(),
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
