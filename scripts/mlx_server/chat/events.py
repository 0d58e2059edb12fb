"""What the core hands a dialect while a request runs: protocol-neutral events, then the completion.

A dialect turns these into its own JSON or server-sent events; the order is
always: ``Started`` (the prompt's usage is final from here on), any number of
deltas, then one ``Finished``.  Silences (a wait in the queue, a long
prefill) are filled by the stream driver that writes the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from mlx_server.vocabulary import CacheLookup, GenerationStats, ToolCall

__all__ = [
    "ChatEvent",
    "Completion",
    "Finished",
    "PromptUsage",
    "ReasoningDelta",
    "Started",
    "TextDelta",
    "ToolCallAbandoned",
    "ToolCallArguments",
    "ToolCallDelta",
    "ToolCallStart",
    "Usage",
]


@dataclass(frozen=True)
class PromptUsage:
    """How the prompt was read: all of it, what came from the prompt cache, and what was written to it.

    The three parts add up: ``prompt_tokens = cached_tokens + cache_written_tokens + uncached_tokens``.
    """

    prompt_tokens: int
    cached_tokens: int
    cache_written_tokens: int

    @property
    def uncached_tokens(self) -> int:
        """Computed and not kept (the cache is off, or the answer was replayed)."""
        return self.prompt_tokens - self.cached_tokens - self.cache_written_tokens


@dataclass(frozen=True)
class Usage:
    """A finished reply's usage: the prompt's, and the tokens generated."""

    prompt: PromptUsage
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Started:
    """The request is admitted: its cache lookup is done and its prompt usage will not change.

    ``echo`` is the prompt's text when a legacy completion asked for it back.
    """

    usage: PromptUsage
    lookup: CacheLookup
    echo: str = ""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call is being written: its id and name; its arguments follow as ``ToolCallArguments``."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """More of a started call's arguments (a call's pieces add up to its final arguments)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A whole call, as soon as it is complete; ``index`` is its place among this reply's calls.

    ``streamed``: it was started (``ToolCallStart``) and its arguments sent already; this only ends it.
    """

    index: int
    call: ToolCall
    streamed: bool = False


@dataclass(frozen=True)
class ToolCallAbandoned:
    """A started call that did not end as one (the token limit cut it short): it is not among the reply's calls."""

    index: int


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
    usage: Usage
    stop_sequence: str | None = None
    echo: str = ""  # the prompt's text, when a legacy completion asked for it back


@dataclass(frozen=True)
class Finished:
    completion: Completion = field(repr=False)


ChatEvent = Union[
    Started, TextDelta, ReasoningDelta, ToolCallStart, ToolCallArguments, ToolCallDelta, ToolCallAbandoned, Finished
]
