"""Ollama's API requests (``/api/chat``, ``/api/generate``, ``/api/embed``), validated and translated into the core's.

Follows Ollama's docs/api.md and api/types.go: images are plain base64 (no data
URL), a tool call's arguments are an object, a tool result names its tool
(``tool_name``), ``think`` is a switch or a level, ``format`` is ``"json"`` or a
JSON schema, and sampling sits in ``options`` (``num_predict``,
``repeat_penalty`` ...).  Options Ollama accepts for its own runner
(``num_gpu``, ``num_thread``, ``mirostat``...) are accepted and have no effect
here, as an unknown option has none in Ollama; ``num_ctx`` never raises the
model's context (the server's window is the model's own).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from mlx_server.chat.request import ChatRequest
from mlx_server.chat.thinking import ThinkingRequest
from mlx_server.dialects.attachments import decode_base64, parse_data_url
from mlx_server.dialects.common import DialectModel, RequestBody
from mlx_server.dialects.openai_chat_protocol import FUNCTION_NAME_PATTERN
from mlx_server.dialects.validation import Finite, unique_tool_names
from mlx_server.embeddings.service import EmbeddingRequest
from mlx_server.vocabulary import (
    ImagePart,
    InvalidRequestError,
    Lane,
    Message,
    Part,
    Sampling,
    TextPart,
    Tool,
    ToolCall,
)

__all__ = [
    "KeepAlive",
    "OllamaChatRequest",
    "OllamaEmbedRequest",
    "OllamaEmbeddingsRequest",
    "OllamaGenerateRequest",
    "OllamaModelRequest",
    "keep_alive_seconds",
    "served_name",
]

KeepAlive = Union[str, int, float]
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_SECONDS_PER_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_seconds(value: KeepAlive | None) -> float | None:
    """Ollama's ``keep_alive`` in seconds (a number of seconds, or a duration such as "5m" or "300ms"): infinite
    when negative (Ollama's "forever"), None when not given."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"keep_alive must be a number of seconds or a duration such as '5m', not {value!r}")
        seconds = float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]
    return math.inf if seconds < 0 else seconds


def served_name(model: str) -> str:
    """The name a request routes by: Ollama's clients add the default tag ``:latest`` to a bare name."""
    return model.removesuffix(":latest")


class Options(DialectModel):
    """The sampling and length options of Ollama's ``options`` (its runner's own are accepted and ignored)."""

    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[Finite, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[Finite, Field(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] | None = None
    seed: int | None = None
    stop: list[str] | None = None
    num_predict: int | None = None  # -1: until the model stops; -2: until the context is full
    num_ctx: Annotated[int, Field(ge=1)] | None = None

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )

    def max_tokens(self) -> int | None:
        """``num_predict`` when positive; -1, -2 and 0 leave it to the model and its context."""
        return self.num_predict if self.num_predict is not None and self.num_predict > 0 else None


def _image_bytes(image: str) -> bytes:
    """An Ollama image: base64 of an image file (a data URL is taken too, as some apps send one)."""
    parsed = parse_data_url(image)
    return decode_base64(image) if parsed is None else parsed[1]


def _decodable(images: list[str] | None) -> list[str] | None:
    for image in images or ():
        _image_bytes(image)
    return images


def _parts(text: str, images: list[str] | None) -> tuple[Part, ...]:
    """The text then its images, as the core's parts (none when there are no images: the text is the content)."""
    return (TextPart(text), *(ImagePart(data=_image_bytes(image)) for image in images)) if images else ()


class CallFunction(DialectModel):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)

    def arguments_text(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)


class OllamaToolCall(DialectModel):
    function: CallFunction
    id: str | None = None


class OllamaMessage(DialectModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("images")
    @classmethod
    def _images(cls, images: list[str] | None) -> list[str] | None:
        return _decodable(images)

    def to_message(self, position: int) -> Message:
        calls = tuple(ToolCall(call.id or f"call_{position}_{index}", call.function.name,
                               call.function.arguments_text())
                      for index, call in enumerate(self.tool_calls or ()))  # fmt: skip
        parts = _parts(self.content, self.images)
        content = "" if parts else self.content
        return Message(self.role, content, calls, self.tool_call_id, self.tool_name, self.thinking, parts)


class FunctionDefinition(DialectModel):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(DialectModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def to_tool(self) -> Tool:
        return Tool(self.function.name, self.function.description, self.function.parameters)


Think = Union[bool, Literal["low", "medium", "high"]]
Format = Union[Literal["json", ""], dict[str, Any]]


class _Generating(RequestBody):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model: str
    format: Format | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True  # Ollama streams unless told not to
    think: Think | None = None
    keep_alive: KeepAlive | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: KeepAlive) -> KeepAlive:
        keep_alive_seconds(value)
        return value

    def json_schema(self) -> dict[str, Any] | None:
        if self.format == "json":
            return {"type": "object"}
        return self.format or None

    def thinking(self) -> ThinkingRequest:
        if isinstance(self.think, bool):
            return ThinkingRequest(enabled=self.think, param="think")
        return ThinkingRequest(effort=self.think, param="think")

    def _chat_request(self, lane: Lane | None, **fields: Any) -> ChatRequest:
        return ChatRequest(
            json_schema=self.json_schema(),
            schema_param="format",
            sampling=self.options.sampling(),
            max_tokens=self.options.max_tokens(),
            length_policy="ceiling",
            length_param="options.num_predict",
            thinking=self.thinking(),
            lane=lane,
            **fields,
        )


class OllamaChatRequest(_Generating):
    """POST /api/chat; no messages (and ``keep_alive``) loads or, with ``keep_alive: 0``, unloads the model."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None

    def to_chat_request(self, lane: Lane | None) -> ChatRequest:
        unique_tool_names(tool.function.name for tool in self.tools or ())
        return self._chat_request(
            lane,
            messages=tuple(message.to_message(index) for index, message in enumerate(self.messages)),
            tools=tuple(tool.to_tool() for tool in self.tools or ()),
            tool_params=tuple(f"tools.{index}.function.parameters" for index in range(len(self.tools or ()))),
        )


class OllamaGenerateRequest(_Generating):
    """POST /api/generate: a prompt (with ``system`` and images) through the chat template, or ``raw`` as is."""

    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    images: list[str] | None = None
    raw: bool = False

    @field_validator("images")
    @classmethod
    def _images(cls, images: list[str] | None) -> list[str] | None:
        return _decodable(images)

    def to_chat_request(self, lane: Lane | None) -> ChatRequest:
        if self.raw:
            return self._chat_request(lane, prompt=self.prompt, suffix=self.suffix)
        parts = _parts(self.prompt, self.images)
        user = Message("user", "" if parts else self.prompt, parts=parts)
        system = (Message("system", self.system),) if self.system else ()
        return self._chat_request(lane, messages=(*system, user))


class OllamaEmbedRequest(RequestBody):
    """POST /api/embed: a text or texts; ``truncate`` false refuses an input longer than the model's context."""

    model: str
    input: str | list[str]
    truncate: bool = True
    dimensions: Annotated[int, Field(ge=1)] | None = None
    keep_alive: KeepAlive | None = None

    def to_embedding_request(self) -> EmbeddingRequest:
        inputs = (self.input,) if isinstance(self.input, str) else tuple(self.input)
        return EmbeddingRequest(inputs, self.dimensions, truncate=self.truncate)


class OllamaEmbeddingsRequest(RequestBody):
    """POST /api/embeddings, the older route: one ``prompt``, one vector."""

    model: str
    prompt: str
    keep_alive: KeepAlive | None = None


class OllamaModelRequest(RequestBody):
    """POST /api/show and /api/pull: a model by name (``name`` is the older field)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False
    stream: bool = True  # /api/pull's progress events
    insecure: bool = False

    def named(self) -> str:
        given = self.model or self.name
        if not given:
            raise InvalidRequestError("model is required", "model")
        return served_name(given)
