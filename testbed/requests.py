"""Requests for the engine itself, as the chat core would make them: sampling laid over plain sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_server.vocabulary import PLAIN_SAMPLING, GenerationRequest, Sampling

__all__ = ["Ask", "ask"]


@dataclass(frozen=True)
class Ask:
    """What a caller asks the engine for besides a prompt: a length limit, sampling, an output grammar."""

    max_tokens: int
    sampling: Sampling = PLAIN_SAMPLING
    grammar: str | None = None

    def request(self, prompt: list[int], stable_prefix: int = 0, **fields: Any) -> GenerationRequest:
        return GenerationRequest(prompt, self.max_tokens, self.sampling, self.grammar, stable_prefix, **fields)


def ask(max_tokens: int, grammar: str | None = None, **sampling: Any) -> Ask:
    """``ask(40, temperature=0.0, stop=("x",))``: sampling fields by name, resolved as the chat core resolves them."""
    return Ask(max_tokens, Sampling(**sampling).over(PLAIN_SAMPLING), grammar)
