"""How every dialect answers, specified against the scripted engine: usage, admission, headers, streams, cancels.

One driver serves all four dialects (``dialects.streaming``): usage is final
when a response starts and adds up to the prompt, a refusal before the
first token is a plain error response, keep-alives fill silences, a failure
after the headers is the dialect's error event, a client that leaves stops
generation, and the headers say what the prompt cache gave.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from mlx_server.chat.prompts import ChatTemplate
from mlx_server.dialects.lanes import lane_key
from mlx_server.settings import Settings
from mlx_server.vocabulary import CacheLookup, Divergence, KVBudgetError, Lane, Message

from .helpers import CHAT, COMPLETIONS, MESSAGES, RESPONSES
from .scripted import Reply, ScriptedServer, scripted_server

USER = [{"role": "user", "content": "Hi"}]
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"messages": USER, "max_tokens": 20, "stream_options": {"include_usage": True}},
    MESSAGES: {"model": "m", "messages": USER, "max_tokens": 20},
    RESPONSES: {"input": "Hi", "max_output_tokens": 20},
    COMPLETIONS: {"prompt": "Hi", "max_tokens": 20, "stream_options": {"include_usage": True}},
}
GENERATING = [CHAT, MESSAGES, RESPONSES]
KEEPALIVE_SECONDS = 0.05


@pytest.fixture
def scripted() -> ScriptedServer:
    return scripted_server()


def body(path: str, stream: bool) -> dict[str, Any]:
    fields = dict(BODIES[path])
    if not stream:
        fields.pop("stream_options", None)
    return {**fields, "stream": stream}


def sse(scripted: ScriptedServer, path: str, fields: dict[str, Any] | None = None) -> list[str]:
    """A streamed reply's lines, comments included, blank lines left out."""
    with scripted.client.stream("POST", path, json=fields or body(path, stream=True)) as response:
        assert response.status_code == 200, response.read()
        return [line for line in response.iter_lines() if line]


def payloads(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def anthropic_input(usage: dict[str, int]) -> int:
    return usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]


class TestUsageAddsUp:
    """Claude Code merges message_start and message_delta usage: both must say the same, and sum to the prompt."""

    LOOKUP = CacheLookup(6, "extended")

    def test_anthropic_start_and_delta_agree_and_sum_to_the_prompt(self, scripted: ScriptedServer) -> None:
        scripted.engine.reply(Reply(lookup=self.LOOKUP))
        events = payloads(sse(scripted, MESSAGES))
        start = events[0]["message"]["usage"]
        delta = next(event for event in events if event["type"] == "message_delta")["usage"]
        prompt_tokens = len(scripted.engine.requests[-1].prompt)
        assert anthropic_input(start) == anthropic_input(delta) == prompt_tokens
        assert start["cache_read_input_tokens"] == delta["cache_read_input_tokens"] == 6
        assert {key: start[key] for key in start if key != "output_tokens"} == {
            key: delta[key] for key in delta if key != "output_tokens"
        }
        assert delta["output_tokens"] > 0

    def test_anthropic_whole_message_sums_to_the_prompt(self, scripted: ScriptedServer) -> None:
        scripted.engine.reply(Reply(lookup=self.LOOKUP))
        usage = scripted.client.post(MESSAGES, json=body(MESSAGES, stream=False)).json()["usage"]
        assert anthropic_input(usage) == len(scripted.engine.requests[-1].prompt)
        assert usage["cache_read_input_tokens"] == 6

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_openai_chat_reports_the_cached_share(self, scripted: ScriptedServer, stream: bool) -> None:
        scripted.engine.reply(Reply(lookup=self.LOOKUP))
        if stream:
            usage = payloads(sse(scripted, CHAT))[-1]["usage"]
        else:
            usage = scripted.client.post(CHAT, json=body(CHAT, stream=False)).json()["usage"]
        assert usage["prompt_tokens"] == len(scripted.engine.requests[-1].prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 6
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_responses_reports_the_cached_share(self, scripted: ScriptedServer, stream: bool) -> None:
        scripted.engine.reply(Reply(lookup=self.LOOKUP))
        if stream:
            usage = payloads(sse(scripted, RESPONSES))[-1]["response"]["usage"]
        else:
            usage = scripted.client.post(RESPONSES, json=body(RESPONSES, stream=False)).json()["usage"]
        assert usage["input_tokens"] == len(scripted.engine.requests[-1].prompt)
        assert usage["input_tokens_details"]["cached_tokens"] == 6


class TestAdmission:
    @pytest.mark.parametrize("path", [*GENERATING, COMPLETIONS])
    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_a_refusal_before_the_first_token_is_an_error_response(
        self, scripted: ScriptedServer, path: str, stream: bool
    ) -> None:
        """A KV budget the request can never fit: a 400 in the dialect's shape, even when it asked to stream."""
        scripted.engine.reply(Reply(error=KVBudgetError("the request needs more KV state than the budget holds")))
        response = scripted.client.post(path, json=body(path, stream))
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert "KV state" in error["message"]
        if path == MESSAGES:
            assert response.json()["type"] == "error" and error["type"] == "invalid_request_error"
        else:
            assert error["code"] == "kv_budget_exceeded"

    @pytest.mark.parametrize("path", GENERATING)
    def test_keepalives_before_the_start_are_comments(self, path: str) -> None:
        """While a request waits for room in the batch, an SSE comment, never a dialect event before its start."""
        settings = Settings(default_temperature=0.0, response_cache_size=0, keepalive_interval=KEEPALIVE_SECONDS)
        scripted = scripted_server(settings)
        scripted.engine.reply(Reply(admitted_after=2.5 * KEEPALIVE_SECONDS))
        lines = sse(scripted, path)
        waited = next(index for index, line in enumerate(lines) if line != ": keep-alive")
        assert waited >= 2 and lines[:2] == [": keep-alive", ": keep-alive"]
        assert lines[waited].startswith(("data: {", "event: message_start", "event: response.created"))


class TestInStreamErrors:
    @pytest.mark.parametrize("path", [*GENERATING, COMPLETIONS])
    def test_a_timeout_after_the_first_token_is_the_dialects_error_event(
        self, scripted: ScriptedServer, path: str
    ) -> None:
        scripted.engine.reply(Reply(finish_reason="timeout"))
        lines = sse(scripted, path)
        last = payloads(lines)[-1]
        if path == MESSAGES:
            assert last == {"type": "error", "error": {"type": "timeout_error", "message": last["error"]["message"]}}
        elif path == RESPONSES:
            assert last["type"] == "response.failed" and last["response"]["error"]["code"] == "request_timeout"
        else:
            assert last["error"]["code"] == "request_timeout"
        assert "data: [DONE]" not in lines


class TestCacheHeaders:
    def test_a_hit_says_how_much_was_read(self, scripted: ScriptedServer) -> None:
        scripted.engine.reply(Reply(lookup=CacheLookup(6, "extended")))
        response = scripted.client.post(CHAT, json=body(CHAT, stream=False))
        assert response.headers["x-prompt-cache-read-tokens"] == "6"
        assert response.headers["x-prompt-cache-source"] == "extended"
        assert "x-prompt-cache-diverged-at-message" not in response.headers

    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_a_miss_says_where_the_prompt_diverged(self, scripted: ScriptedServer, stream: bool) -> None:
        """The message index (into the request's messages) and its role, for streamed replies too."""
        messages = [Message("system", "You are terse."), Message("user", "What is a monad?")]
        prompt = ChatTemplate(scripted.engine.tokenizer).tokens(messages)
        at = len(prompt) - 6  # inside the user message
        lookup = CacheLookup(0, "miss", Divergence(at, (1, 2, 3), tuple(prompt[at : at + 3])))
        scripted.engine.reply(Reply(lookup=lookup))
        fields = {"messages": [{"role": m.role, "content": m.content} for m in messages], "stream": stream}
        with scripted.client.stream("POST", CHAT, json=fields) as response:
            headers = response.headers
            response.read()
        assert headers["x-prompt-cache-read-tokens"] == "0" and headers["x-prompt-cache-source"] == "miss"
        assert headers["x-prompt-cache-diverged-at-token"] == str(at)
        assert headers["x-prompt-cache-diverged-at-message"] == "1"
        assert headers["x-prompt-cache-diverged-role"] == "user"


class TestLanes:
    def test_claude_codes_session_names_the_lane(self, scripted: ScriptedServer) -> None:
        """X-Claude-Code-Session-Id (and a subagent's X-Claude-Code-Agent-Id) name the lane, as digests only."""
        session = "0f0e3c1e-9d7b-4b7e-9a3c-2f2d4a6b8c9d"
        scripted.client.post(MESSAGES, json=body(MESSAGES, False), headers={"x-claude-code-session-id": session})
        scripted.client.post(
            MESSAGES,
            json=body(MESSAGES, False),
            headers={"x-claude-code-session-id": session, "x-claude-code-agent-id": "agent-7"},
        )
        main, subagent = (request.lane for request in scripted.engine.requests[-2:])
        assert main == lane_key("claude-code", session) and subagent == lane_key("claude-code", session, "agent-7")
        assert main is not None and session not in str(main)

    @pytest.mark.parametrize(
        ("path", "fields", "headers", "expected"),
        [
            (CHAT, {"prompt_cache_key": "thread-1"}, {}, lane_key("key", "thread-1")),
            (CHAT, {"user": "alice"}, {}, lane_key("user", "alice")),
            (RESPONSES, {"prompt_cache_key": "thread-2"}, {"session-id": "s"}, lane_key("key", "thread-2")),
            (RESPONSES, {}, {"thread-id": "t-9", "session-id": "s"}, lane_key("codex", "t-9")),
            (CHAT, {}, {}, None),
        ],
        ids=["prompt_cache_key", "user", "key over headers", "codex thread", "none"],
    )
    def test_openai_fields_and_codex_headers(
        self,
        scripted: ScriptedServer,
        path: str,
        fields: dict[str, Any],
        headers: dict[str, str],
        expected: Lane | None,
    ) -> None:
        scripted.client.post(path, json={**body(path, False), **fields}, headers=headers)
        assert scripted.engine.requests[-1].lane == expected


class TestLeaving:
    def test_a_client_that_leaves_a_whole_reply_stops_its_generation(self, scripted: ScriptedServer) -> None:
        """No stream, so no write fails: the route itself notices the disconnect and cancels the request."""
        scripted.engine.reply(Reply(["word " * 200], seconds_per_token=0.01))
        asyncio.run(_post_then_disconnect(scripted, CHAT, {"messages": USER, "max_tokens": 200}))
        assert scripted.engine.cancelled == scripted.engine.requests[-1:]

    def test_a_call_that_starts_over_ends_the_reply(self, scripted: ScriptedServer) -> None:
        """A forced call repeated through its first argument: the engine is told to stop, the reply has one call."""
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        scripted.engine.reply(Reply([call, call, call, call], seconds_per_token=0.001))
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        response = scripted.client.post(
            CHAT, json={"messages": USER, "tools": [tool], "tool_choice": "required", "max_tokens": 200}
        )
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1
        assert scripted.engine.ended_early == scripted.engine.requests[-1:]


async def _post_then_disconnect(scripted: ScriptedServer, path: str, fields: dict[str, Any]) -> None:
    """Send a request through the ASGI interface, then hang up a moment later, as a client that gave up."""
    app = scripted.client.app
    sent = False
    hang_up = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(fields).encode(), "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"scripted")],
        "client": ("127.0.0.1", 1),
        "server": ("scripted", 80),
    }
    handling = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.sleep(0.2)
    hang_up.set()
    await asyncio.wait_for(handling, timeout=10)
