"""OpenAI legacy completions requests, validated by pydantic and translated into the core's ``ChatRequest``.

One prompt (text, or token ids) per request; lists of prompts, ``n > 1``,
``best_of`` and ``logprobs`` are refused with a message that says so.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from mlx_server.chat.request import ChatRequest
from mlx_server.dialects.common import RequestBody
from mlx_server.dialects.openai_chat_protocol import MAX_STOP_SEQUENCES, StreamOptions
from mlx_server.dialects.validation import Finite
from mlx_server.vocabulary import Sampling, UnsupportedOptionError

__all__ = ["DEFAULT_MAX_TOKENS", "CompletionRequest"]

DEFAULT_MAX_TOKENS = 16
TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(RequestBody):
    """POST /v1/completions (one prompt; lists of prompts and ``n > 1`` are refused)."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    model: str = "default"
    max_tokens: Annotated[int, Field(ge=1)] = DEFAULT_MAX_TOKENS
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Finite, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    suffix: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    best_of: Annotated[int, Field(ge=1)] = 1
    logprobs: int | None = None

    def single_prompt(self) -> str | tuple[int, ...]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise UnsupportedOptionError("prompt", "send one prompt per request (this server returns one choice)")
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else tuple(prompt)  # type: ignore[arg-type]

    def to_chat_request(self) -> ChatRequest:
        if self.n != 1 or self.best_of != 1:
            raise UnsupportedOptionError("n", "n and best_of must be 1: this server returns one choice")
        if self.logprobs:
            raise UnsupportedOptionError("logprobs", "logprobs are not supported by this server")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return ChatRequest(
            prompt=self.single_prompt(),
            suffix=self.suffix,
            sampling=Sampling(
                temperature=self.temperature,
                top_p=self.top_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                stop=tuple(stops),
            ),
            max_tokens=self.max_tokens,
            length_param="max_tokens",
            echo=self.echo,
        )
