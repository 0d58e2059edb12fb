"""What the core hands a dialect while a request runs: protocol-neutral events, then the completion.

A dialect turns these into its own JSON or server-sent events; the order is
always: any number of deltas (and keep-alives), then one ``Finished``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from mlx_server.chat.request import ToolCall
from mlx_server.generation import GenerationStats

__all__ = ["ChatEvent", "Completion", "Finished", "Keepalive", "ReasoningDelta", "TextDelta", "ToolCallDelta"]


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A whole call, as soon as it is complete; ``index`` is its place among this reply's calls."""

    index: int
    call: ToolCall


@dataclass(frozen=True)
class Keepalive:
    """Nothing happened for a while (a long prefill, a wait in the queue); streams send a comment or a ping."""


@dataclass
class Completion:
    """A finished reply.

    ``finish_reason`` is ``stop`` (the model ended, or ``stop_sequence``
    matched), ``length`` (the token limit, or the context is full) or
    ``tool_calls``; ``cancelled`` and ``timeout`` never reach a dialect as a
    completion.
    """

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    stats: GenerationStats
    finish_reason: str
    stop_sequence: str | None = None
    cache_written_tokens: int = 0  # prompt tokens this request stored in the prompt cache


@dataclass(frozen=True)
class Finished:
    completion: Completion = field(repr=False)


ChatEvent = Union[TextDelta, ReasoningDelta, ToolCallDelta, Keepalive, Finished]
