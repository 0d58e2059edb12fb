"""OpenAI Responses API requests, validated by pydantic and translated into the core's ``ChatRequest``.

``input`` is a string or a list of items (``message`` with text, image and
file parts, ``function_call``, ``function_call_output``, ``custom_tool_call``
and its output, ``reasoning``); ``input_image`` and ``input_file`` parts
(data URLs) become the core's image and document parts.  Tools the server cannot run (``web_search``,
``tool_search``, ``file_search``, MCP, computer use …) are left out of the
prompt with a level-1 debug line, never a 400, since agents such as Codex
send them on every request.  A ``namespace`` tool's functions are offered as
``<namespace>__<name>`` (Codex's own flat spelling) and their calls are
returned under the namespace and name the client expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from mlx_server.chat.request import ChatRequest
from mlx_server.chat.thinking import ThinkingRequest
from mlx_server.dialects.attachments import document_from_data, image_from_url
from mlx_server.dialects.common import DialectModel, RequestBody
from mlx_server.dialects.lanes import body_lane
from mlx_server.dialects.openai_chat_protocol import FUNCTION_NAME_PATTERN
from mlx_server.dialects.validation import Finite, most_specific, param_path, unique_tool_names
from mlx_server.vocabulary import (
    CUSTOM_TOOL,
    DocumentPart,
    Effort,
    Lane,
    Message,
    Part,
    Role,
    Sampling,
    Tool,
    ToolCall,
    ToolChoice,
    ToolGrammar,
    UnsupportedOptionError,
)
from mlx_server.vocabulary import TextPart as CoreTextPart
from utils_logging import debug

__all__ = ["NAMESPACE_SEPARATOR", "ResponsesRequest", "ToolNames"]

NAMESPACE_SEPARATOR = "__"


class TextPart(DialectModel):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class RefusalPart(DialectModel):
    type: Literal["refusal"]
    refusal: str


class ImagePart(DialectModel):
    """``input_image``: a data URL (its bytes) or a plain URL (never fetched); file ids are refused."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _data_given(self) -> ImagePart:
        if self.image_url is None:
            raise ValueError("file ids are not supported here: send the image as image_url (a data URL)")
        image_from_url(self.image_url)
        return self

    def part(self) -> Part:
        assert self.image_url is not None
        return image_from_url(self.image_url)


class FilePart(DialectModel):
    """``input_file``: a PDF or a text file as a data URL (``file_data``); documents are read as text."""

    type: Literal["input_file"]
    file_data: str | None = None
    file_url: str | None = None
    file_id: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _data_given(self) -> FilePart:
        if self.file_data is None and self.file_url is None:
            raise ValueError("file ids are not supported here: send the file's data (file_data, a data URL)")
        if self.file_data is not None:
            document_from_data(self.file_data, self.filename)
        return self

    def part(self) -> Part:
        if self.file_data is None:
            return DocumentPart(url=self.file_url, title=self.filename)
        return document_from_data(self.file_data, self.filename)


class AudioPart(DialectModel):
    type: Literal["input_audio"]

    @model_validator(mode="after")
    def _refuse(self) -> AudioPart:
        raise ValueError("input_audio parts are not supported: the models served here read text and images")


ContentPart = Annotated[Union[TextPart, RefusalPart, ImagePart, FilePart, AudioPart], Field(discriminator="type")]


def _text(content: str | list[ContentPart]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, TextPart) else getattr(part, "refusal", "") for part in content)


def _message(role: Role, content: str | list[ContentPart], **fields: Any) -> Message:
    """A message of text, or of parts when the content has images or files."""
    if isinstance(content, list) and any(isinstance(part, (ImagePart, FilePart)) for part in content):
        parts = tuple(
            part.part() if isinstance(part, (ImagePart, FilePart)) else CoreTextPart(_text([part])) for part in content
        )
        return Message(role, "", parts=parts, **fields)
    return Message(role, _text(content), **fields)


class MessageItem(DialectModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(DialectModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(DialectModel):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: str | list[ContentPart]


class CustomToolCallItem(DialectModel):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str


class ReasoningItem(DialectModel):
    type: Literal["reasoning"]
    summary: list[TextPart] = Field(default_factory=list)
    content: list[TextPart] | None = None

    def text(self) -> str:
        parts = self.content if self.content else self.summary
        return "".join(part.text for part in parts)


class OtherItem(DialectModel):
    """An item this server never produces (hosted tool calls, compaction …): accepted and left out."""

    type: str


InputItem = Union[MessageItem, FunctionCallItem, FunctionCallOutputItem, CustomToolCallItem, ReasoningItem, OtherItem]
_ITEM_TYPES: dict[str, type[DialectModel]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "reasoning": ReasoningItem,
}


class FunctionTool(DialectModel):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomFormat(DialectModel):
    type: Literal["text", "grammar"]
    syntax: Literal["lark", "regex"] | None = None
    definition: str | None = None

    @model_validator(mode="after")
    def _grammar_given(self) -> CustomFormat:
        if self.type == "grammar" and (self.syntax is None or self.definition is None):
            raise ValueError("a grammar format needs 'syntax' (lark or regex) and 'definition'")
        return self


class CustomTool(DialectModel):
    type: Literal["custom"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    format: CustomFormat | None = None


class NamespaceTool(DialectModel):
    type: Literal["namespace"]
    name: str
    description: str | None = None
    tools: list[FunctionTool | CustomTool]


class HostedTool(DialectModel):
    """A tool OpenAI runs on its side (web_search, tool_search, file_search …): this server cannot."""

    type: str

    @field_validator("type")
    @classmethod
    def _not_a_client_tool(cls, value: str) -> str:
        if value in ("function", "custom", "namespace"):
            raise ValueError(f"an invalid {value} tool")
        return value


class JsonSchemaTextFormat(DialectModel):
    type: Literal["json_schema"]
    name: str = "output"
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class SimpleTextFormat(DialectModel):
    type: Literal["text", "json_object"]


class TextOptions(DialectModel):
    format: Annotated[SimpleTextFormat | JsonSchemaTextFormat, Field(discriminator="type")] | None = None


class NamedChoice(DialectModel):
    type: Literal["function", "custom"]
    name: str


class AllowedTools(DialectModel):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class ToolNames:
    """The flat names the model sees for namespaced functions, and the way back."""

    namespaced: dict[str, tuple[str, str]]  # flat name -> (namespace, name)

    def split(self, flat: str) -> tuple[str | None, str]:
        namespace, name = self.namespaced.get(flat, (None, flat))
        return namespace, name


def _flat(namespace: str, name: str) -> str:
    return f"{namespace.rstrip('_')}{NAMESPACE_SEPARATOR}{name.lstrip('_')}"


def _core_tool(tool: FunctionTool | CustomTool, name: str) -> Tool:
    if isinstance(tool, CustomTool):
        grammar = None
        if tool.format is not None and tool.format.type == "grammar":
            grammar = ToolGrammar(tool.format.syntax or "lark", tool.format.definition or "")
        return Tool(name, tool.description, kind=CUSTOM_TOOL, grammar=grammar)
    return Tool(name, tool.description, tool.parameters, strict=tool.strict)


class ReasoningOptions(DialectModel):
    """``reasoning``: its ``effort`` (a ``summary`` is accepted; the reasoning is returned whole)."""

    effort: Effort | None = None
    summary: str | None = None


class ResponsesRequest(RequestBody):
    """POST /v1/responses."""

    model: str = "default"
    input: str | list[dict[str, Any]] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    tools: list[Annotated[FunctionTool | CustomTool | NamespaceTool, Field(discriminator="type")] | HostedTool] = Field(
        default_factory=list
    )
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | AllowedTools | HostedTool = "auto"
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    stream: bool = False
    prompt_cache_key: str | None = None
    user: str | None = None
    reasoning: ReasoningOptions | None = None

    def input_items(self) -> list[InputItem]:
        """The input as typed items (a string is one user message); unknown item types are kept as OtherItem."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        items: list[InputItem] = []
        for index, raw in enumerate(self.input):
            kind = raw.get("type", "message") if isinstance(raw, dict) else None
            model = _ITEM_TYPES.get(kind, OtherItem) if isinstance(kind, str) else MessageItem
            try:
                items.append(model.model_validate(raw))  # type: ignore[arg-type]
            except ValueError as error:
                raise _item_error(index, error) from error
        return items

    def tool_names(self) -> ToolNames:
        namespaced = {}
        for tool in self.tools:
            if isinstance(tool, NamespaceTool):
                for inner in tool.tools:
                    namespaced[_flat(tool.name, inner.name)] = (tool.name, inner.name)
        return ToolNames(namespaced)

    def core_tools(self) -> tuple[Tool, ...]:
        offered: list[Tool] = []
        for tool in self.tools:
            if isinstance(tool, NamespaceTool):
                offered += [_core_tool(inner, _flat(tool.name, inner.name)) for inner in tool.tools]
            elif isinstance(tool, (FunctionTool, CustomTool)):
                offered.append(_core_tool(tool, tool.name))
            else:
                debug(1, "Left out a tool this server cannot run", {"type": tool.type})
        unique_tool_names(tool.name for tool in offered)
        return tuple(offered)

    def core_tool_choice(self, tools: tuple[Tool, ...]) -> tuple[ToolChoice, tuple[Tool, ...]]:
        """The choice, and the tools it leaves offered (``allowed_tools`` narrows them)."""
        choice = self.tool_choice
        names = [tool.name for tool in tools]
        if isinstance(choice, str):
            if choice == "required" and not tools:
                raise UnsupportedOptionError("tool_choice", "tool_choice 'required' needs at least one function tool")
            return ToolChoice(choice), tools
        if isinstance(choice, NamedChoice):
            if choice.name not in names:
                raise UnsupportedOptionError(
                    "tool_choice", f"tool_choice names {choice.name!r}, which is not among the tools"
                )
            return ToolChoice("required", choice.name), tools
        if isinstance(choice, AllowedTools):
            allowed = {str(tool.get("name")) for tool in choice.tools}
            narrowed = tuple(tool for tool in tools if tool.name in allowed) or tools
            return ToolChoice(choice.mode), narrowed
        debug(1, "A hosted tool choice cannot be honoured here; the model chooses", {"type": choice.type})
        return ToolChoice("auto"), tools

    def json_schema(self) -> dict[str, Any] | None:
        text_format = self.text.format if self.text is not None else None
        if isinstance(text_format, JsonSchemaTextFormat):
            return text_format.json_schema
        if isinstance(text_format, SimpleTextFormat) and text_format.type == "json_object":
            return {"type": "object"}
        return None

    def input_conversation(self) -> tuple[Message, ...]:
        """This request's input as messages (without the instructions, which are never carried over)."""
        return input_messages(self.input_items(), self.tool_names())

    def to_chat_request(self, conversation: tuple[Message, ...], header_lane: Lane | None = None) -> ChatRequest:
        """``conversation``: the stored one ``previous_response_id`` names, then this request's input."""
        tools = self.core_tools()
        choice, tools = self.core_tool_choice(tools)
        system = (Message("system", self.instructions),) if self.instructions else ()
        return ChatRequest(
            messages=system + conversation,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            json_schema=self.json_schema(),
            sampling=Sampling(temperature=self.temperature, top_p=self.top_p),
            max_tokens=self.max_output_tokens,
            length_param="max_output_tokens",
            tool_params=tuple(f"tools[{tool.name}]" for tool in tools),
            schema_param="text.format.schema",
            lane=body_lane(self.prompt_cache_key, None) or header_lane or body_lane(None, self.user),
            thinking=ThinkingRequest(
                effort=self.reasoning.effort if self.reasoning else None, param="reasoning.effort"
            ),
        )


def _item_error(index: int, error: ValueError) -> UnsupportedOptionError:
    """The item's field at fault, as the other dialects name theirs (a union's closest alternative)."""
    details = getattr(error, "errors", None)
    if callable(details) and details():
        first = most_specific(details())
        where = param_path(first.get("loc", ()))
        message = str(first.get("msg", error)).removeprefix("Value error, ")
        return UnsupportedOptionError(f"input[{index}]{'.' + where if where else ''}", f"invalid input item: {message}")
    return UnsupportedOptionError(f"input[{index}]", f"invalid input item: {error}")


def input_messages(items: list[InputItem], names: ToolNames) -> tuple[Message, ...]:
    """Items -> messages: adjacent assistant text, reasoning and calls become one assistant turn."""
    flat_names = {value: key for key, value in names.namespaced.items()}
    messages: list[Message] = []
    assistant: dict[str, Any] | None = None

    def flush() -> None:
        nonlocal assistant
        if assistant is not None:
            reasoning = assistant["reasoning"] or None
            messages.append(Message("assistant", assistant["text"], tuple(assistant["calls"]), reasoning=reasoning))
            assistant = None

    def open_assistant() -> dict[str, Any]:
        nonlocal assistant
        if assistant is None:
            assistant = {"text": "", "calls": [], "reasoning": ""}
        return assistant

    for item in items:
        if isinstance(item, MessageItem) and item.role == "assistant":
            turn = open_assistant()
            if turn["calls"]:
                flush()
                turn = open_assistant()
            turn["text"] += _text(item.content)
        elif isinstance(item, ReasoningItem):
            flush()
            open_assistant()["reasoning"] += item.text()
        elif isinstance(item, FunctionCallItem):
            name = flat_names.get((item.namespace, item.name), item.name) if item.namespace else item.name
            open_assistant()["calls"].append(ToolCall(item.call_id, name, item.arguments))
        elif isinstance(item, CustomToolCallItem):
            open_assistant()["calls"].append(ToolCall(item.call_id, item.name, item.input, CUSTOM_TOOL))
        elif isinstance(item, FunctionCallOutputItem):
            flush()
            messages.append(_message("tool", item.output, tool_call_id=item.call_id))
        elif isinstance(item, MessageItem):
            flush()
            messages.append(_message("system" if item.role in ("system", "developer") else "user", item.content))
        else:
            debug(1, "Left out an input item this server does not use", {"type": item.type})
    flush()
    return tuple(messages)
