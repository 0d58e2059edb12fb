"""``POST /v1/completions``: OpenAI's legacy text completions over the chat core.

The prompt (text, or token ids) is used as it is, without the chat template;
``suffix`` asks for fill-in-the-middle in the model's own FIM tokens (a 400
when it has none); ``echo`` puts the prompt before the completion.  As in
OpenAI's API, ``max_tokens`` defaults to 16.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_server.chat.events import Completion, Started, TextDelta, Usage
from mlx_server.dialects.common import new_id, sse_data, traced
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.errors import APIError, openai_error_body
from mlx_server.dialects.openai_chat import DONE, openai_usage
from mlx_server.dialects.openai_completions_protocol import CompletionRequest
from mlx_server.dialects.streaming import SSE, SSE_KEEPALIVE, Delta, serve_chat, with_cancellation
from mlx_server.vocabulary import UnsupportedOptionError

__all__ = ["COMPLETIONS_PATH", "build_router"]

COMPLETIONS_PATH = "/v1/completions"


class TextCompletionReply:
    """The ``text_completion`` objects of one reply (whole, or as chunks); also its stream encoder."""

    keepalive = SSE_KEEPALIVE
    media_type = SSE

    def __init__(self, body: CompletionRequest, model: str) -> None:
        self.id = new_id("cmpl-")
        self.created = int(time.time())
        self.body = body
        self.model = model

    def object(self, text: str, finish_reason: str | None, usage: Usage | None = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if usage is not None:
            body["usage"] = {key: value for key, value in openai_usage(usage).items() if key != "prompt_tokens_details"}
        return body

    def whole(self, completion: Completion) -> dict[str, Any]:
        return self.object(completion.echo + completion.text, completion.finish_reason, completion.usage)

    def start(self, started: Started) -> list[bytes]:
        return [sse_data(self.object(started.echo, None))] if started.echo else []

    def delta(self, delta: Delta) -> list[bytes]:
        return [sse_data(self.object(delta.text, None))] if isinstance(delta, TextDelta) else []

    def finish(self, completion: Completion) -> list[bytes]:
        chunks = [sse_data(self.object("", completion.finish_reason))]
        options = self.body.stream_options
        if options is not None and options.include_usage:
            chunks.append(sse_data({**self.object("", None, completion.usage), "choices": []}))
        return [*chunks, DONE]

    def error(self, error: APIError) -> list[bytes]:
        return [sse_data(openai_error_body(error.message, error.error_type, error.param, error.code))]


def build_router(models: ModelDirectory, keepalive: float) -> APIRouter:
    """Routed by the request's model."""
    router = APIRouter()

    @router.post(COMPLETIONS_PATH, response_model=None)
    @with_cancellation
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.stream_options is not None and not body.stream:
            raise UnsupportedOptionError("stream_options", "stream_options is only allowed when stream is true")
        chat_request = body.to_chat_request()
        reply = functools.partial(TextCompletionReply, body)
        return await serve_chat(models, body.model, chat_request, body.stream, reply, keepalive, lambda: traced(body))

    return router
