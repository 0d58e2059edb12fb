"""Generated text -> reasoning, content and tool calls, as it streams.

A reasoning model writes its thinking between markers (``<think>`` …
``</think>``, or the pair mlx-lm finds in its vocabulary); some chat templates
open the thinking block in the prompt, so the output starts inside it.
gpt-oss writes in harmony channels instead: ``analysis`` is its thinking,
``final`` its answer, and the channel headers are not content.  Thinking
becomes reasoning pieces; what follows goes through the tool-call extractor
(when the request offered tools) and comes out as content and whole calls.
Nothing here knows a wire format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from mlx_lm.generate import TextStateMachine

from mlx_server.chat.call_pieces import CallAbandonedPiece, CallArgumentsPiece, CallPiece, CallStartPiece, ContentPiece
from mlx_server.chat.tool_parsing import ToolCallExtractor, ToolCalling

__all__ = ["HARMONY_REASONING", "OutputParser", "ReasoningPiece", "ReasoningSyntax", "reasoning_syntax"]

REASONING = "reasoning"
NORMAL = "normal"


@dataclass
class ReasoningPiece:
    text: str


OutputPiece = Union[ContentPiece, CallPiece, CallStartPiece, CallArgumentsPiece, CallAbandonedPiece, ReasoningPiece]


@dataclass(frozen=True)
class ReasoningSyntax:
    """How a model marks its thinking, whether its prompt already opened a thinking block, and markers to drop."""

    start: str
    end: str
    starts_inside: bool = False
    skipped: tuple[str, ...] = ()  # markers that are neither reasoning nor content (harmony's channel headers)


HARMONY_REASONING = ReasoningSyntax(
    "<|channel|>analysis<|message|>",
    "<|end|>",
    skipped=(
        "<|start|>assistant",
        "<|channel|>final<|message|>",
        "<|channel|>commentary<|message|>",
        "<|end|>",
        "<|return|>",
    ),
)


def reasoning_syntax(tokenizer: Any, prompt: Sequence[int], harmony: bool = False) -> ReasoningSyntax | None:
    """The thinking markers mlx-lm found for this tokenizer, or harmony's channels (None: not a reasoning model).

    ``harmony``: the model writes in gpt-oss's channels (its profile knows).
    The output starts inside a thinking block when the prompt's last start
    marker comes after its last end marker (Qwen3-style generation prompts).
    """
    if harmony:
        return HARMONY_REASONING
    if not getattr(tokenizer, "has_thinking", False):
        return None
    last_start = tokenizer.rfind_think_start(list(prompt))
    last_end = tokenizer.rfind_think_end(list(prompt))
    return ReasoningSyntax(tokenizer.think_start, tokenizer.think_end, starts_inside=last_start > last_end)


class OutputParser:
    """Feed text as it is generated; get pieces that are safe to send (partial markers are held back)."""

    def __init__(self, reasoning: ReasoningSyntax | None, tool_calling: ToolCalling | None) -> None:
        self._machine: TextStateMachine | None = None
        if reasoning is not None:
            normal = [(reasoning.start, REASONING), *((marker, NORMAL) for marker in reasoning.skipped)]
            machine = TextStateMachine({NORMAL: normal, REASONING: [(reasoning.end, NORMAL)]})
            self._machine = machine
            self._state = machine.make_state(REASONING if reasoning.starts_inside else NORMAL)
        self._after_reasoning = False  # the whitespace templates put after the thinking is not content
        self._calls: ToolCallExtractor | None = tool_calling.extractor() if tool_calling is not None else None

    @property
    def calls(self) -> list[Any]:
        return self._calls.calls if self._calls is not None else []

    @property
    def repeated_a_call(self) -> bool:
        """The output repeated a call it already made: what follows is a loop, not an answer."""
        return self._calls is not None and self._calls.repeated

    def feed(self, text: str) -> list[OutputPiece]:
        if self._machine is None:
            return self._content(text)
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._route(segments)

    def finish(self) -> list[OutputPiece]:
        """What is still held back: a partial marker, an unfinished call (closed or dropped)."""
        pieces: list[OutputPiece] = []
        if self._machine is not None:
            self._state, held, state_name = TextStateMachine.flush(self._state)
            pieces += self._route([(state_name, held)])
        if self._calls is not None:
            pieces += self._calls.finish()
        return pieces

    def _route(self, segments: list[tuple[str | None, str]]) -> list[OutputPiece]:
        pieces: list[OutputPiece] = []
        for state_name, text in segments:
            if not text:
                continue
            if state_name == REASONING:
                pieces.append(ReasoningPiece(text))
                self._after_reasoning = True
                continue
            if self._after_reasoning:
                text = text.lstrip()
                self._after_reasoning = not text
            pieces += self._content(text)
        return pieces

    def _content(self, text: str) -> list[OutputPiece]:
        if self._calls is None:
            return [ContentPiece(text)] if text else []
        return list(self._calls.feed(text))
