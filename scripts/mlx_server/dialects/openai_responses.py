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

import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mlx_server.chat.events import Completion, Finished, Keepalive, ReasoningDelta, TextDelta, ToolCallDelta
from mlx_server.chat.request import CUSTOM_TOOL, Message, ToolCall
from mlx_server.chat.service import ChatRun, ChatService
from mlx_server.dialects.common import event_stream, new_id, sse_event
from mlx_server.dialects.openai_chat import KEEPALIVE
from mlx_server.dialects.openai_responses_protocol import ResponsesRequest, ToolNames
from mlx_server.errors import APIError

__all__ = ["DEFAULT_STORED_RESPONSES", "RESPONSES_PATH", "ResponseStore", "build_router"]

RESPONSES_PATH = "/v1/responses"
DEFAULT_STORED_RESPONSES = 256


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and the conversation it ends (input and output, instructions excluded)."""

    body: dict[str, Any]
    conversation: tuple[Message, ...]


class ResponseStore:
    """The responses kept for ``previous_response_id``: a bounded LRU, safe from any thread (one lock)."""

    def __init__(self, max_entries: int = DEFAULT_STORED_RESPONSES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse:
        """The stored response; APIError 404 in OpenAI's words when it is unknown (or was evicted)."""
        with self._lock:
            found = self._entries.get(response_id)
            if found is not None:
                self._entries.move_to_end(response_id)
        if found is None:
            raise APIError(
                404,
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return found

    def put(self, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._entries[response_id] = stored
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def _usage(completion: Completion) -> dict[str, Any]:
    stats = completion.stats
    return {
        "input_tokens": stats.prompt_tokens,
        "input_tokens_details": {"cached_tokens": stats.cached_tokens},
        "output_tokens": stats.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }


class _Output:
    """The reply's output items, built as events arrive; also yields the stream events that announce them."""

    def __init__(self, names: ToolNames) -> None:
        self.items: list[dict[str, Any]] = []
        self._names = names
        self._open: dict[str, Any] | None = None
        self._text = ""

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


class _Reply:
    """One response object's fields, from creation to its final state."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.id = new_id("resp_")
        self.created_at = int(time.time())
        self.body = body
        self.output = _Output(body.tool_names())

    def snapshot(self, status: str, completion: Completion | None = None) -> dict[str, Any]:
        body = self.body
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
            "model": body.model,
            "output": self.output.items if completion is not None else [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": body.store,
            "temperature": body.temperature,
            "text": {"format": text_format},
            "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump(),
            "tools": [tool.model_dump(by_alias=True, exclude_none=True) for tool in body.tools],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": _usage(completion) if completion is not None else None,
            "user": None,
            "metadata": body.metadata or {},
        }

    def finish(self, completion: Completion) -> list[dict[str, Any]]:
        """Feed a whole completion (the non-streaming path) and close the last item."""
        events = self.output.reasoning(completion.reasoning) if completion.reasoning else []
        if completion.text or not completion.tool_calls:
            events += self.output.text(completion.text)
        for call in completion.tool_calls:
            events += self.output.call(call)
        return events + self.output.close()

    def conversation_turn(self, completion: Completion) -> Message:
        return Message(
            "assistant", completion.text, tuple(completion.tool_calls), reasoning=completion.reasoning or None
        )


def _event(payload: dict[str, Any], sequence: int) -> bytes:
    return sse_event(str(payload["type"]), {**payload, "sequence_number": sequence})


async def _stream(run: ChatRun, reply: _Reply, remember: Callable[[Completion], None]) -> AsyncIterator[bytes]:
    sequence = 0

    def emit(payload: dict[str, Any]) -> bytes:
        nonlocal sequence
        sequence += 1
        return _event(payload, sequence - 1)

    yield emit({"type": "response.created", "response": reply.snapshot("in_progress")})
    yield emit({"type": "response.in_progress", "response": reply.snapshot("in_progress")})
    output = reply.output
    try:
        async for event in run.events():
            payloads: list[dict[str, Any]] = []
            if isinstance(event, Keepalive):
                yield KEEPALIVE
            elif isinstance(event, TextDelta):
                payloads = output.text(event.text)
            elif isinstance(event, ReasoningDelta):
                payloads = output.reasoning(event.text)
            elif isinstance(event, ToolCallDelta):
                payloads = output.call(event.call)
            elif isinstance(event, Finished):
                completion = event.completion
                if not output.items:  # an empty reply is still one (empty) message
                    payloads += output.text("")
                payloads += output.close()
                remember(completion)
                final = reply.snapshot("completed", completion)
                payloads.append({"type": f"response.{final['status']}", "response": final})
            for payload in payloads:
                yield emit(payload)
    except APIError as error:  # headers are sent: an error event, then the failed response
        yield emit({"type": "error", "code": error.code, "message": error.message, "param": error.param})
        failed = {**reply.snapshot("failed"), "error": {"code": error.code or "server_error", "message": error.message}}
        yield emit({"type": "response.failed", "response": failed})


def build_router(service: Callable[[], ChatService], store: ResponseStore | None = None) -> APIRouter:
    """``service`` returns the chat core (APIError 503 while the model loads)."""
    router = APIRouter()
    responses = store or ResponseStore()

    @router.post(RESPONSES_PATH, response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        core = service()
        history = responses.get(body.previous_response_id).conversation if body.previous_response_id else ()
        conversation = history + body.input_conversation()
        if not conversation:
            raise APIError(400, "input is empty: send a string or at least one input item", param="input")
        run = core.start(body.to_chat_request(conversation), trace=lambda: body.model_dump(exclude_unset=True))
        reply = _Reply(body)

        def remember(completion: Completion) -> None:
            if body.store:
                stored = StoredResponse(
                    reply.snapshot("completed", completion), (*conversation, reply.conversation_turn(completion))
                )
                responses.put(reply.id, stored)

        if body.stream:
            return event_stream(_stream(run, reply, remember))
        completion = await run.complete(request)
        reply.finish(completion)
        remember(completion)
        return JSONResponse(reply.snapshot("completed", completion))

    @router.get(RESPONSES_PATH + "/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        try:
            return responses.get(response_id).body
        except APIError as error:
            raise APIError(
                404, f"No response found with id '{response_id}'.", param="response_id", code="not_found"
            ) from error

    return router
