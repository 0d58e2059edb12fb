"""Screenshots and PDFs in a session, on a model that reads text: every dialect answers, and says what it left out.

Claude Code's Read tool returns a screenshot as an image block inside a
``tool_result``, and the session sends it again with every later turn; Codex
and OpenCode send images as ``input_image`` / ``image_url`` parts.  On a text
model each image becomes one short placeholder in its place (so the session
goes on instead of failing on every turn), ``x-attachments-left-out`` counts
it, and ``count_tokens`` agrees with the prompt that ran.  PDFs become their
text layer, page by page; a PDF without one is left out the same way.  Bad
data is a 400 in the dialect's own error shape.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from mlx_server.chat.attachments import IMAGE_PLACEHOLDER, UNREADABLE_DOCUMENT
from testbed.documents import data_url, pdf, png

from .helpers import CHAT, MESSAGES, RESPONSES
from .scripted import ScriptedServer, scripted_server

SCREENSHOT = png()
REPORT = pdf(["Quarterly report\nRevenue grew by 12 percent", "Page two says the outlook is stable"])
SCAN = pdf([""])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server() -> ScriptedServer:
    return scripted_server()


def prompt_of(server: ScriptedServer) -> str:
    return str(server.engine.tokenizer.decode(server.engine.requests[-1].prompt))


def claude_code_session(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Claude Code's shape: Read called, its result (image blocks inside tool_result), then a question."""
    return [
        {"role": "user", "content": "Look at shot.png"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "shot.png"}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": result},
                {"type": "text", "text": "What does it show?"},
            ],
        },
    ]


def anthropic_image() -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(SCREENSHOT)}}


def anthropic_body(messages: list[dict[str, Any]], stream: bool = False) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 4, "temperature": 0, "stream": stream, "messages": messages}


def chat_session() -> dict[str, Any]:
    """OpenCode's shape: the tool's text, then the image in a user message."""
    return {
        "model": "m", "max_tokens": 4, "temperature": 0,
        "messages": [
            {"role": "user", "content": "Look at shot.png"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "read", "arguments": '{"path": "shot.png"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Image read successfully"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(SCREENSHOT, "image/png")}},
                                         {"type": "text", "text": "What does it show?"}]},
        ],
    }  # fmt: skip


def responses_session() -> dict[str, Any]:
    """Codex's shape: the tool's output holds the image as ``input_image``."""
    image = {"type": "input_image", "image_url": data_url(SCREENSHOT, "image/png")}
    return {
        "model": "m", "max_output_tokens": 4, "temperature": 0,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Look at shot.png"}]},
            {"type": "function_call", "call_id": "call_1", "name": "view_image", "arguments": '{"path": "shot.png"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": [image]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What does it show?"}]},
        ],
    }  # fmt: skip


SESSIONS = {
    MESSAGES: lambda: anthropic_body(claude_code_session([anthropic_image()])),
    CHAT: chat_session,
    RESPONSES: responses_session,
}


class TestImagesOnATextModel:
    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    @pytest.mark.parametrize("path", list(SESSIONS))
    def test_an_image_is_left_out_in_its_place_and_the_session_answers(
        self, server: ScriptedServer, path: str, stream: bool
    ) -> None:
        response = server.fast.post(path, json={**SESSIONS[path](), "stream": stream})
        assert response.status_code == 200, response.text
        assert response.headers["x-attachments-left-out"] == "1 image"
        prompt = prompt_of(server)
        assert prompt.count(IMAGE_PLACEHOLDER) == 1
        assert prompt.index("Look at shot.png") < prompt.index(IMAGE_PLACEHOLDER) < prompt.index("What does it show?")

    def test_count_tokens_agrees_with_the_prompt_that_ran(self, server: ScriptedServer) -> None:
        session = claude_code_session([anthropic_image(), {"type": "text", "text": "64x48 PNG"}])
        server.fast.post(MESSAGES, json=anthropic_body(session))
        counted = server.fast.post(MESSAGES + "/count_tokens", json={"model": "claude-test", "messages": session})
        assert counted.json()["input_tokens"] == len(server.engine.requests[-1].prompt)

    def test_every_later_turn_renders_the_same_prefix(self, server: ScriptedServer) -> None:
        """The placeholder does not change between turns, so the prompt cache keeps the session's prefix."""
        session = claude_code_session([anthropic_image()])
        server.fast.post(MESSAGES, json=anthropic_body(session))
        first = list(server.engine.requests[-1].prompt)
        later = [*session, {"role": "assistant", "content": "A chart."}, {"role": "user", "content": "And now?"}]
        server.fast.post(MESSAGES, json=anthropic_body(later))
        assert server.engine.requests[-1].prompt[: len(first) - 8] == first[: len(first) - 8]

    def test_an_error_result_with_an_image_keeps_both(self, server: ScriptedServer) -> None:
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                  "content": [{"type": "text", "text": "partial read"}, anthropic_image()]}  # fmt: skip
        session = claude_code_session([])
        session[2] = {"role": "user", "content": [result]}
        assert server.fast.post(MESSAGES, json=anthropic_body(session)).status_code == 200
        prompt = prompt_of(server)
        assert "Error:" in prompt and "partial read" in prompt and IMAGE_PLACEHOLDER in prompt

    def test_an_image_by_url_is_left_out_without_a_fetch(self, server: ScriptedServer) -> None:
        image = {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1:9/shot.png"}}
        body = anthropic_body([{"role": "user", "content": [image, {"type": "text", "text": "Describe"}]}])
        response = server.fast.post(MESSAGES, json=body)
        assert response.status_code == 200 and response.headers["x-attachments-left-out"] == "1 image"

    def test_a_request_without_attachments_has_no_header(self, server: ScriptedServer) -> None:
        response = server.fast.post(MESSAGES, json=anthropic_body([{"role": "user", "content": "Hi"}]))
        assert "x-attachments-left-out" not in response.headers


def pdf_bodies(data: bytes) -> dict[str, dict[str, Any]]:
    """The same PDF as each dialect sends one, titled report.pdf."""
    url = data_url(data, "application/pdf")
    return {
        MESSAGES: anthropic_body([{"role": "user", "content": [
            {"type": "document", "title": "report.pdf",
             "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)}},
            {"type": "text", "text": "Summarize it."}]}]),
        CHAT: {"model": "m", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_data": url, "filename": "report.pdf"}},
            {"type": "text", "text": "Summarize it."}]}]},
        RESPONSES: {"model": "m", "max_output_tokens": 4, "temperature": 0, "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_file", "file_data": url, "filename": "report.pdf"},
                {"type": "input_text", "text": "Summarize it."}]}]},
    }  # fmt: skip


class TestDocuments:
    @pytest.mark.parametrize("path", [MESSAGES, CHAT, RESPONSES])
    def test_a_pdf_is_read_as_its_text_page_by_page(self, server: ScriptedServer, path: str) -> None:
        response = server.fast.post(path, json=pdf_bodies(REPORT)[path])
        assert response.status_code == 200, response.text
        assert "x-attachments-left-out" not in response.headers
        prompt = prompt_of(server)
        assert "report.pdf" in prompt
        assert (
            prompt.index("Revenue grew by 12 percent") < prompt.index("outlook is stable") < prompt.index("Summarize")
        )
        assert "--- page 2 ---" in prompt

    @pytest.mark.parametrize("path", [MESSAGES, CHAT, RESPONSES])
    def test_a_pdf_without_text_is_left_out_and_counted(self, server: ScriptedServer, path: str) -> None:
        response = server.fast.post(path, json=pdf_bodies(SCAN)[path])
        assert response.status_code == 200, response.text
        assert response.headers["x-attachments-left-out"] == "1 document"
        assert UNREADABLE_DOCUMENT in prompt_of(server)

    def test_a_text_document_is_its_text(self, server: ScriptedServer) -> None:
        document = {"type": "document", "title": "notes.txt",
                    "source": {"type": "text", "media_type": "text/plain", "data": "Remember the milk"}}  # fmt: skip
        body = anthropic_body([{"role": "user", "content": [document, {"type": "text", "text": "What to buy?"}]}])
        assert server.fast.post(MESSAGES, json=body).status_code == 200
        assert "Document: notes.txt\nRemember the milk" in prompt_of(server)

    @pytest.mark.parametrize("path", [MESSAGES, CHAT, RESPONSES])
    def test_bytes_that_are_no_pdf_are_a_400_in_the_dialects_shape(self, server: ScriptedServer, path: str) -> None:
        response = server.fast.post(path, json=pdf_bodies(b"this is not a PDF at all")[path])
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert "PDF" in error["message"]
        if path == MESSAGES:
            assert response.json()["type"] == "error"

    def test_an_unsupported_document_type_is_a_400_naming_it(self, server: ScriptedServer) -> None:
        source = {"type": "base64", "media_type": "application/zip", "data": b64(b"PK\x03\x04")}
        body = anthropic_body([{"role": "user", "content": [{"type": "document", "source": source}]}])
        response = server.fast.post(MESSAGES, json=body)
        assert response.status_code == 400 and "application/zip" in response.json()["error"]["message"]


class TestBadAttachments:
    @pytest.mark.parametrize(
        ("path", "body"),
        [
            (MESSAGES, anthropic_body([{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}]}])),
            (CHAT, {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}]}),
            (RESPONSES, {"model": "m", "input": [{"type": "message", "role": "user", "content": [
                {"type": "input_image", "file_id": "file-123"}]}]}),
            (RESPONSES, {"model": "m", "input": [{"type": "message", "role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
        ],
        ids=["anthropic-not-base64", "chat-data-url-not-base64", "responses-file-id", "responses-audio"],
    )  # fmt: skip
    def test_refused_with_a_400_that_names_the_part(self, server: ScriptedServer, path: str, body: Any) -> None:
        response = server.fast.post(path, json=body)
        assert response.status_code == 400, response.text
        message = json.dumps(response.json())
        assert "content" in message or "input" in message

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            (MESSAGES, anthropic_body([{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@not"}}]}])),
            (CHAT, {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not"}}]}]}),
            (RESPONSES, {"model": "m", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64,@@@not"}]}]}),
        ],
        ids=["messages", "chat", "responses"],
    )  # fmt: skip
    def test_corrupt_base64_says_so_in_every_dialect(self, server: ScriptedServer, path: str, body: Any) -> None:
        """Responses once said 'Input should be a valid string' (param input[0].content.str) for the same image."""
        response = server.fast.post(path, json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert "not valid base64 data" in error["message"] and ".str" not in json.dumps(error)
