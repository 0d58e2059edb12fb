"""``POST /v1/completions``: OpenAI's legacy text completions over the chat core.

The prompt (text, or token ids) is used as it is, without the chat template;
``suffix`` asks for fill-in-the-middle in the model's own FIM tokens (a 400
when it has none); ``echo`` puts the prompt before the completion.  As in
OpenAI's API, ``max_tokens`` defaults to 16.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, field_validator

from mlx_server.chat.events import Finished, TextDelta
from mlx_server.chat.request import ChatRequest, Sampling
from mlx_server.chat.service import ChatRun, ChatService
from mlx_server.dialects.common import RequestBody, event_stream, new_id, sse_data
from mlx_server.dialects.openai_chat import DONE, KEEPALIVE, usage
from mlx_server.dialects.openai_chat_protocol import MAX_STOP_SEQUENCES, StreamOptions
from mlx_server.errors import APIError, UnsupportedOptionError, openai_error_body
from mlx_server.generation import GenerationStats

__all__ = ["COMPLETIONS_PATH", "CompletionRequest", "build_router"]

COMPLETIONS_PATH = "/v1/completions"
DEFAULT_MAX_TOKENS = 16
TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(RequestBody):
    """POST /v1/completions (one prompt; lists of prompts and ``n > 1`` are refused)."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    model: str = "default"
    max_tokens: Annotated[int, Field(ge=1)] = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    suffix: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    best_of: Annotated[int, Field(ge=1)] = 1
    logprobs: int | None = None

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

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
        )


class _Reply:
    def __init__(self, body: CompletionRequest, echo_text: str) -> None:
        self.id = new_id("cmpl-")
        self.created = int(time.time())
        self.body = body
        self.echo_text = echo_text

    def object(self, text: str, finish_reason: str | None, stats: GenerationStats | None = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": [choice],
        }
        if stats is not None:
            body["usage"] = {key: value for key, value in usage(stats).items() if key != "prompt_tokens_details"}
        return body


async def _stream(run: ChatRun, reply: _Reply) -> AsyncIterator[bytes]:
    try:
        if reply.echo_text:
            yield sse_data(reply.object(reply.echo_text, None))
        async for event in run.events():
            if isinstance(event, TextDelta):
                yield sse_data(reply.object(event.text, None))
            elif isinstance(event, Finished):
                yield sse_data(reply.object("", event.completion.finish_reason))
                options = reply.body.stream_options
                if options is not None and options.include_usage:
                    usage_chunk = {**reply.object("", None, event.completion.stats), "choices": []}
                    yield sse_data(usage_chunk)
                yield DONE
            else:
                yield KEEPALIVE
    except APIError as error:
        yield sse_data(openai_error_body(error.message, error.error_type, error.param, error.code))


def build_router(service: Callable[[], ChatService]) -> APIRouter:
    """``service`` returns the chat core (APIError 503 while the model loads)."""
    router = APIRouter()

    @router.post(COMPLETIONS_PATH, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        core = service()
        if body.stream_options is not None and not body.stream:
            raise UnsupportedOptionError("stream_options", "stream_options is only allowed when stream is true")
        chat_request = body.to_chat_request()
        run = core.start(chat_request, trace=lambda: body.model_dump(exclude_unset=True))
        prompt = chat_request.prompt
        echo_text = (
            "" if not body.echo else prompt if isinstance(prompt, str) else core.tokenizer.decode(list(prompt or ()))
        )
        reply = _Reply(body, echo_text)
        if body.stream:
            return event_stream(_stream(run, reply))
        completion = await run.complete(request)
        return JSONResponse(reply.object(echo_text + completion.text, completion.finish_reason, completion.stats))

    return router
