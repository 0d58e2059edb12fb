"""A chat request as the core sees it, whichever API dialect it arrived in.

Each dialect (OpenAI chat completions, Anthropic messages, OpenAI responses,
legacy completions) validates its own JSON with pydantic and translates it
into these frozen dataclasses; nothing below the dialects knows a wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CUSTOM_TOOL",
    "FUNCTION_TOOL",
    "ChatRequest",
    "LengthPolicy",
    "Message",
    "Sampling",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolGrammar",
]

Role = Literal["system", "user", "assistant", "tool"]
FUNCTION_TOOL = "function"
CUSTOM_TOOL = "custom"


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is JSON text for functions, the raw input for custom tools."""

    id: str
    name: str
    arguments: str
    kind: str = FUNCTION_TOOL


@dataclass(frozen=True)
class Message:
    """One conversation turn; ``reasoning`` is a reasoning model's thinking, echoed back by the client."""

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None


@dataclass(frozen=True)
class ToolGrammar:
    """The grammar a custom tool's input must follow: ``lark`` or ``regex`` syntax."""

    syntax: Literal["lark", "regex"]
    definition: str


@dataclass(frozen=True)
class Tool:
    """A tool the model may call.

    A ``function`` takes JSON arguments that match ``parameters``; a ``custom``
    tool takes free text, or text in ``grammar`` when it has one.
    """

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    kind: str = FUNCTION_TOOL
    grammar: ToolGrammar | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        """A function without parameters takes an empty object (OpenAI's and Anthropic's reading)."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}

    def as_template_tool(self) -> dict[str, Any]:
        """The Hugging Face chat-template convention for one tool."""
        if self.kind == CUSTOM_TOOL:
            custom: dict[str, Any] = {"type": "custom", "name": self.name}
            if self.description:
                custom["description"] = self.description
            if self.grammar is not None:
                custom["format"] = {"syntax": self.grammar.syntax, "definition": self.grammar.definition}
            return custom
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters_schema()
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``none``, ``auto`` or ``required``; ``name`` forces one tool (and implies ``required``)."""

    mode: Literal["none", "auto", "required"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class Sampling:
    """How to sample; ``None`` penalties are off, a ``None`` temperature is the server's default."""

    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


LengthPolicy = Literal["reject", "ceiling"]
"""What a completion limit past the context means: OpenAI's 400 (``reject``) or Anthropic's cap (``ceiling``)."""


@dataclass(frozen=True)
class ChatRequest:
    """Everything the core needs to answer one request.

    ``prompt`` replaces the chat template for the legacy completions API (text,
    or token ids); otherwise ``messages`` are rendered through it.
    """

    messages: tuple[Message, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    json_schema: dict[str, Any] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None
    length_policy: LengthPolicy = "reject"
    length_param: str = "max_tokens"
    prompt: str | tuple[int, ...] | None = None
    suffix: str | None = None
    tool_params: tuple[str, ...] = ()  # where each tool's schema sits in the request, for error messages
    schema_param: str = "response_format.json_schema.schema"

    @property
    def tool_mode(self) -> str:
        """``none`` when no tools are offered; otherwise the choice's mode (a named tool is required)."""
        if not self.tools or self.tool_choice.mode == "none":
            return "none"
        return "required" if self.tool_choice.name is not None else self.tool_choice.mode

    def tool_named(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)
