"""A chat request as the core sees it, whichever API dialect it arrived in.

Each dialect (OpenAI chat completions, Anthropic messages, OpenAI responses,
legacy completions) validates its own JSON with pydantic and translates it
into this frozen dataclass, built from the shared vocabulary; nothing below
the dialects knows a wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mlx_server.chat.thinking import ThinkingRequest
from mlx_server.vocabulary import Lane, Message, Sampling, Tool, ToolChoice, ToolMode

__all__ = ["ChatRequest", "LengthPolicy"]

LengthPolicy = Literal["reject", "ceiling"]
"""What a completion limit past the context means in the dialect's own API: a 400 (OpenAI's) or a cap (Anthropic's).

The server caps either way unless it runs with ``--strict-max-tokens``.
"""


@dataclass(frozen=True)
class ChatRequest:
    """Everything the core needs to answer one request.

    ``prompt`` replaces the chat template for the legacy completions API (text,
    or token ids); otherwise ``messages`` are rendered through it.  ``lane``
    names the client's session (a header or a body field), whose cache
    entries other sessions cannot evict.
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
    lane: Lane | None = None
    echo: bool = False  # a legacy completion asks for its prompt back before the completion
    thinking: ThinkingRequest = field(default_factory=ThinkingRequest)

    @property
    def tool_mode(self) -> ToolMode:
        """``none`` when no tools are offered; otherwise the choice's mode (a named tool is required)."""
        if not self.tools or self.tool_choice.mode == "none":
            return "none"
        return "required" if self.tool_choice.name is not None else self.tool_choice.mode

    def tool_named(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)
