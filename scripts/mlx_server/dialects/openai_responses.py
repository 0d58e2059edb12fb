"""``POST /v1/responses`` (and ``GET /v1/responses/{id}``): OpenAI's Responses API over the chat core.

The default path of Codex CLI, openai-agents, pydantic-ai and the AI SDK.
Output items are ``reasoning`` (a reasoning model's thinking), ``message``
(``output_text``), ``function_call`` and ``custom_tool_call``; a reply cut by
``max_output_tokens`` is ``incomplete``.  Streams send the documented events
in order, each with a ``sequence_number``.  With ``store`` (the default) a
response is kept in a bounded in-memory LRU, so ``previous_response_id`` can
continue it; an unknown id is a 404.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mlx_server.chat.events import (
    Completion,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallAbandoned,
    ToolCallArguments,
    ToolCallStart,
    Usage,
)
from mlx_server.dialects.common import new_id, sse_event, traced
from mlx_server.dialects.directory import ModelDirectory
from mlx_server.dialects.errors import APIError
from mlx_server.dialects.lanes import lane_of_headers
from mlx_server.dialects.openai_responses_protocol import ReasoningOptions, ResponsesRequest, ToolNames
from mlx_server.dialects.responses_store import ResponseStore, StoredResponse
from mlx_server.dialects.streaming import SSE, SSE_KEEPALIVE, Delta, serve_chat, with_cancellation
from mlx_server.vocabulary import CUSTOM_TOOL, InvalidRequestError, Message, NotFoundError, ToolCall

__all__ = ["RESPONSES_PATH", "build_router"]

RESPONSES_PATH = "/v1/responses"


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.prompt.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


class _Output:
    """The reply's output items, built as events arrive; also yields the stream events that announce them."""

    def __init__(self, names: ToolNames) -> None:
        self.items: list[dict[str, Any]] = []
        self._names = names
        self._open: dict[str, Any] | None = None
        self._text = ""
        self._writing: dict[int, tuple[int, dict[str, Any]]] = {}  # streamed calls: index -> (output index, item)

    def start_call(self, index: int, call_id: str, name: str) -> list[dict[str, Any]]:
        """A function call being written: its item, in progress, with no arguments yet."""
        events = self.close()
        item = self._call_item(ToolCall(call_id, name, ""))
        item["status"] = "in_progress"
        self.items.append(item)
        self._writing[index] = (self.index, item)
        return [*events, {"type": "response.output_item.added", "output_index": self.index, "item": {**item}}]

    def call_arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        output_index, item = self._writing[index]
        item["arguments"] += text
        at = {"item_id": item["id"], "output_index": output_index}
        return [{"type": "response.function_call_arguments.delta", **at, "delta": text}]

    def end_call(self, index: int, completed: bool) -> list[dict[str, Any]]:
        """A streamed call ends: whole (``completed``), or cut short (its item ``incomplete``)."""
        output_index, item = self._writing.pop(index)
        item["status"] = "completed" if completed else "incomplete"
        at = {"item_id": item["id"], "output_index": output_index}
        done = {"type": "response.function_call_arguments.done", **at, "arguments": item["arguments"],
                "name": item["name"]}  # fmt: skip
        return [done, {"type": "response.output_item.done", "output_index": output_index, "item": item}]

    @property
    def index(self) -> int:
        return len(self.items) - 1

    def reasoning(self, text: str) -> list[dict[str, Any]]:
        events = self._start("reasoning") if self._kind() != "reasoning" else []
        self._text += text
        item_id = self.items[-1]["id"]
        return [*events, {"type": "response.reasoning_text.delta", **self._at(item_id), "delta": text}]

    def text(self, text: str) -> list[dict[str, Any]]:
        events = self._start("message") if self._kind() != "message" else []
        self._text += text
        item_id = self.items[-1]["id"]
        return [*events, {"type": "response.output_text.delta", **self._at(item_id), "delta": text, "logprobs": []}]

    def call(self, call: ToolCall) -> list[dict[str, Any]]:
        events = self.close()
        item = self._call_item(call)
        self.items.append(item)
        at = {"item_id": item["id"], "output_index": self.index}
        if call.kind == CUSTOM_TOOL:
            events += [
                {
                    "type": "response.output_item.added",
                    "output_index": self.index,
                    "item": {**item, "input": "", "status": "in_progress"},
                },
                {"type": "response.custom_tool_call_input.delta", **at, "delta": call.arguments},
                {"type": "response.custom_tool_call_input.done", **at, "input": call.arguments},
            ]
        else:
            events += [
                {
                    "type": "response.output_item.added",
                    "output_index": self.index,
                    "item": {**item, "arguments": "", "status": "in_progress"},
                },
                {"type": "response.function_call_arguments.delta", **at, "delta": call.arguments},
                {
                    "type": "response.function_call_arguments.done",
                    **at,
                    "arguments": call.arguments,
                    "name": item["name"],
                },
            ]
        return [*events, {"type": "response.output_item.done", "output_index": self.index, "item": item}]

    def close(self) -> list[dict[str, Any]]:
        """Finish the open reasoning or message item."""
        if self._open is None:
            return []
        item, text = self.items[-1], self._text
        at = self._at(item["id"])
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
            events = [{"type": "response.reasoning_text.done", **at, "text": text}]
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            events = [
                {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
                {"type": "response.content_part.done", **at, "part": part},
            ]
        item["status"] = "completed"
        self._open, self._text = None, ""
        return [*events, {"type": "response.output_item.done", "output_index": self.index, "item": item}]

    def _kind(self) -> str | None:
        return None if self._open is None else str(self._open["type"])

    def _start(self, kind: str) -> list[dict[str, Any]]:
        events = self.close()
        if kind == "reasoning":
            item: dict[str, Any] = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "status": "in_progress"}
        else:
            item = {
                "id": new_id("msg_"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        self.items.append(item)
        self._open = item
        events.append({"type": "response.output_item.added", "output_index": self.index, "item": {**item}})
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append({"type": "response.content_part.added", **self._at(item["id"]), "part": part})
        return events

    def _at(self, item_id: str) -> dict[str, Any]:
        return {"item_id": item_id, "output_index": self.index, "content_index": 0}

    def _call_item(self, call: ToolCall) -> dict[str, Any]:
        namespace, name = self._names.split(call.name)
        if call.kind == CUSTOM_TOOL:
            return {
                "id": new_id("ctc_"),
                "type": "custom_tool_call",
                "status": "completed",
                "call_id": call.id,
                "name": name,
                "input": call.arguments,
            }
        item = {
            "id": new_id("fc_"),
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": name,
            "arguments": call.arguments,
        }
        if namespace is not None:
            item["namespace"] = namespace
        return item


class ResponseObject:
    """One response object's fields, from creation to its final state; also its stream encoder."""

    keepalive = SSE_KEEPALIVE
    media_type = SSE

    def __init__(
        self, body: ResponsesRequest, store: ResponseStore, conversation: tuple[Message, ...], model: str
    ) -> None:
        self.id = new_id("resp_")
        self.model = model
        self.created_at = int(time.time())
        self.body = body
        self.output = _Output(body.tool_names())
        self._store = store
        self._conversation = conversation
        self._sequence = 0

    def snapshot(self, status: str, completion: Completion | None = None) -> dict[str, Any]:
        body = self.body
        reasoning = body.reasoning or ReasoningOptions()
        incomplete = completion is not None and completion.finish_reason == "length"
        text_format = body.text.format.model_dump(by_alias=True) if body.text and body.text.format else {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": "incomplete" if incomplete else status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": self.output.items if completion is not None else [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary},
            "store": body.store,
            "temperature": body.temperature,
            "text": {"format": text_format},
            "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump(),
            "tools": [tool.model_dump(by_alias=True, exclude_none=True) for tool in body.tools],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": _usage(completion.usage) if completion is not None else None,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def _add_whole(self, completion: Completion) -> None:
        """Feed a whole completion (the non-streaming path) and close the last item."""
        if completion.reasoning:
            self.output.reasoning(completion.reasoning)
        if completion.text or not completion.tool_calls:
            self.output.text(completion.text)
        for call in completion.tool_calls:
            self.output.call(call)
        self.output.close()

    def conversation_turn(self, completion: Completion) -> Message:
        return Message(
            "assistant", completion.text, tuple(completion.tool_calls), reasoning=completion.reasoning or None
        )

    def _remember(self, completion: Completion) -> None:
        """With ``store`` (the default), keep the response and its conversation for ``previous_response_id``."""
        if self.body.store:
            turn = (*self._conversation, self.conversation_turn(completion))
            self._store.put(self.id, StoredResponse(self.snapshot("completed", completion), turn))

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The non-streamed reply: every item, the final state, stored if asked."""
        self._add_whole(completion)
        self._remember(completion)
        return self.snapshot("completed", completion)

    # -- the stream encoder --------------------------------------------------------

    def _emit(self, payloads: list[dict[str, Any]]) -> list[bytes]:
        events = []
        for payload in payloads:
            events.append(sse_event(str(payload["type"]), {**payload, "sequence_number": self._sequence}))
            self._sequence += 1
        return events

    def start(self, started: Started) -> list[bytes]:
        return self._emit(
            [
                {"type": "response.created", "response": self.snapshot("in_progress")},
                {"type": "response.in_progress", "response": self.snapshot("in_progress")},
            ]
        )

    def delta(self, delta: Delta) -> list[bytes]:
        if isinstance(delta, TextDelta):
            return self._emit(self.output.text(delta.text))
        if isinstance(delta, ReasoningDelta):
            return self._emit(self.output.reasoning(delta.text))
        if isinstance(delta, ToolCallStart):
            return self._emit(self.output.start_call(delta.index, delta.id, delta.name))
        if isinstance(delta, ToolCallArguments):
            return self._emit(self.output.call_arguments(delta.index, delta.text))
        if isinstance(delta, ToolCallAbandoned):
            return self._emit(self.output.end_call(delta.index, completed=False))
        if delta.streamed:
            return self._emit(self.output.end_call(delta.index, completed=True))
        return self._emit(self.output.call(delta.call))

    def finish(self, completion: Completion) -> list[bytes]:
        payloads: list[dict[str, Any]] = []
        if not self.output.items:  # an empty reply is still one (empty) message
            payloads += self.output.text("")
        payloads += self.output.close()
        self._remember(completion)
        final = self.snapshot("completed", completion)
        payloads.append({"type": f"response.{final['status']}", "response": final})
        return self._emit(payloads)

    def error(self, error: APIError) -> list[bytes]:
        failed = {**self.snapshot("failed"), "error": {"code": error.code or "server_error", "message": error.message}}
        return self._emit(
            [
                {"type": "error", "code": error.code, "message": error.message, "param": error.param},
                {"type": "response.failed", "response": failed},
            ]
        )


def build_router(models: ModelDirectory, keepalive: float, store: ResponseStore | None = None) -> APIRouter:
    """Routed by the request's model."""
    router = APIRouter()
    responses = store or ResponseStore()

    @router.post(RESPONSES_PATH, response_model=None)
    @with_cancellation
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        history = responses.get(body.previous_response_id).conversation if body.previous_response_id else ()
        conversation = history + body.input_conversation()
        if not conversation:
            raise InvalidRequestError("input is empty: send a string or at least one input item", "input")
        chat_request = body.to_chat_request(conversation, lane_of_headers(request.headers))
        reply = functools.partial(ResponseObject, body, responses, conversation)
        return await serve_chat(models, body.model, chat_request, body.stream, reply, keepalive, lambda: traced(body))

    @router.get(RESPONSES_PATH + "/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        try:
            return responses.get(response_id).body
        except NotFoundError as error:
            raise NotFoundError(
                f"No response found with id '{response_id}'.", param="response_id", code="not_found"
            ) from error

    return router
