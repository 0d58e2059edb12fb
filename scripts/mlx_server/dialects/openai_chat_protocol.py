"""OpenAI chat-completions requests, validated by pydantic and translated into the core's ``ChatRequest``.

Requests are strict: a string where a number belongs, a negative max_tokens,
or an unknown role is a 400 that names the field, never a silent coercion.
An explicit null means the field was not given, as OpenAI's spec allows.
Unknown fields are ignored (clients send newer options); known options this
server cannot honour are refused with a message that says so.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from mlx_server.chat.request import ChatRequest
from mlx_server.chat.thinking import ThinkingRequest
from mlx_server.dialects.attachments import document_from_data, image_from_url
from mlx_server.dialects.common import DialectModel, RequestBody
from mlx_server.dialects.lanes import body_lane
from mlx_server.dialects.validation import Finite, unique_tool_names
from mlx_server.vocabulary import (
    Effort,
    Lane,
    Message,
    Part,
    Sampling,
    TextPart,
    Tool,
    ToolCall,
    UnsupportedOptionError,
)
from mlx_server.vocabulary import ToolChoice as CoreToolChoice

__all__ = [
    "AssistantToolCall",
    "ChatCompletionRequest",
    "ChatMessage",
    "ContentPart",
    "FunctionDefinition",
    "NamedToolChoice",
    "ResponseFormat",
    "StreamOptions",
    "ToolDefinition",
]

MAX_STOP_SEQUENCES = 4
_Strict = DialectModel


class TextContent(_Strict):
    type: Literal["text"]
    text: str

    def part(self) -> Part:
        return TextPart(self.text)


class ImageUrl(_Strict):
    url: str
    detail: str | None = None


class ImageContent(_Strict):
    """An image: a data URL (its bytes) or a plain URL (never fetched)."""

    type: Literal["image_url"]
    image_url: ImageUrl

    @field_validator("image_url")
    @classmethod
    def _decodable(cls, value: ImageUrl) -> ImageUrl:
        image_from_url(value.url)
        return value

    def part(self) -> Part:
        return image_from_url(self.image_url.url)


class FileData(_Strict):
    file_data: str | None = None
    filename: str | None = None
    file_id: str | None = None

    @model_validator(mode="after")
    def _data_given(self) -> FileData:
        if self.file_data is None:
            raise ValueError("file ids are not supported here: send the file's data (file_data, a data URL)")
        document_from_data(self.file_data, self.filename)
        return self


class FileContent(_Strict):
    """A file (OpenAI's ``file`` part): a PDF or a text file as a data URL; documents are text."""

    type: Literal["file"]
    file: FileData

    def part(self) -> Part:
        assert self.file.file_data is not None
        return document_from_data(self.file.file_data, self.file.filename)


ContentPart = Annotated[Union[TextContent, ImageContent, FileContent], Field(discriminator="type")]


class FunctionCall(_Strict):
    """A call as the client echoes it back in history; arguments are a JSON string (an object is accepted)."""

    name: str
    arguments: str | dict[str, Any] = "{}"

    def arguments_text(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def to_tool(self) -> Tool:
        function = self.function
        return Tool(function.name, function.description, function.parameters, strict=function.strict)


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``{"type": "function", "function": {"name": ...}}``: the model must call this function."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The schema the whole output must match (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.json_schema or {"type": "object"}
        return None


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ChatMessage(_Strict):
    """A chat message; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[AssistantToolCall] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextContent))

    def to_message(self) -> Message:
        """``developer`` (OpenAI's newer name for ``system``) is rendered as ``system``; images and files are parts."""
        calls = tuple(
            ToolCall(call.id, call.function.name, call.function.arguments_text()) for call in self.tool_calls or ()
        )
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list) and any(not isinstance(part, TextContent) for part in self.content):
            parts = tuple(part.part() for part in self.content)
            return Message(role, "", calls, self.tool_call_id, self.name, parts=parts)
        return Message(role, self.text(), calls, self.tool_call_id, self.name)


class StreamOptions(_Strict):
    include_usage: bool = False


Probability = Annotated[Finite, Field(ge=0.0, le=1.0)]


class ChatCompletionRequest(RequestBody):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str = "default"
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[Finite, Field(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    user: str | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: Effort | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's; its thinking switch is honoured

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) wins over ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse options this server recognises but cannot honour (raises UnsupportedOptionError)."""
        if self.n != 1:
            raise UnsupportedOptionError("n", f"n={self.n} is not supported: this server returns one choice (n=1)")
        if self.logprobs or self.top_logprobs:
            raise UnsupportedOptionError("logprobs", "logprobs are not supported by this server")
        self._check_tools()
        if self.stream_options is not None and not self.stream:
            raise UnsupportedOptionError("stream_options", "stream_options is only allowed when stream is true")

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or []]
        unique_tool_names(names)
        if self.tool_choice is None or self.tool_choice == "none":
            return
        if not names:
            raise UnsupportedOptionError("tool_choice", "tool_choice needs a non-empty 'tools' list")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise UnsupportedOptionError(
                "tool_choice",
                f"tool_choice names {self.tool_choice.function.name!r}, "
                f"which is not among the tools: {', '.join(names)}",
            )

    def thinking(self) -> ThinkingRequest:
        """``reasoning_effort``, and a thinking switch in vLLM's ``chat_template_kwargs`` (``enable_thinking``)."""
        kwargs = self.chat_template_kwargs or {}
        switch = next((kwargs[name] for name in ("enable_thinking", "thinking") if name in kwargs), None)
        if switch is not None and not isinstance(switch, bool):
            raise UnsupportedOptionError(
                "chat_template_kwargs.enable_thinking", "enable_thinking must be true or false"
            )
        param = "reasoning_effort" if switch is None else "chat_template_kwargs.enable_thinking"
        return ThinkingRequest(enabled=switch, effort=self.reasoning_effort, param=param)

    def to_chat_request(self, header_lane: Lane | None = None) -> ChatRequest:
        """The core's view of this request (call ``check_supported`` first); its lane from the body or headers."""
        if isinstance(self.tool_choice, NamedToolChoice):
            choice = CoreToolChoice("required", self.tool_choice.function.name)
        else:
            choice = CoreToolChoice(self.tool_choice or "auto")
        return ChatRequest(
            messages=tuple(message.to_message() for message in self.messages),
            tools=tuple(tool.to_tool() for tool in self.tools or ()),
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            json_schema=self.response_format.output_schema() if self.response_format else None,
            sampling=Sampling(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                stop=tuple(self.stop_sequences()),
            ),
            max_tokens=self.requested_max_tokens(),
            length_policy="reject",
            thinking=self.thinking(),
            length_param="max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens",
            lane=body_lane(self.prompt_cache_key, None) or header_lane or body_lane(None, self.user),
        )
