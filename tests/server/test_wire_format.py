"""Raw HTTP: the SSE wire format, the guide's curl command, queueing, and disconnects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from typing import Any

import httpx
import pytest

from .conftest import RunningServer
from .helpers import DEFAULT_MODEL

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    return [event for event in raw.split("\n\n") if event]


class TestServerSentEvents:
    def test_wire_format(self, server: RunningServer) -> None:
        """role delta, content deltas, finish chunk with empty delta, usage chunk, then [DONE]."""
        story = [{"role": "user", "content": "Write a long story about a dragon."}]
        body = {"model": "m", "messages": story, "max_tokens": 8, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", f"{server.api_url}/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = "".join(response.iter_text())
        events = _events(raw)
        assert all(event.startswith("data: ") for event in events)
        assert events[-1] == "data: [DONE]"
        chunks: list[dict[str, Any]] = [json.loads(event[len("data: ") :]) for event in events[:-1]]
        assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        contents = chunks[1:-2]
        assert contents and all(set(chunk["choices"][0]["delta"]) == {"content"} for chunk in contents)
        assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-2])
        finish = chunks[-2]["choices"][0]
        assert finish["delta"] == {} and finish["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8

    def test_multibyte_characters_are_never_split(self, server: RunningServer) -> None:
        """Every delta is whole UTF-8 text: no replacement characters from split bytes."""
        body = {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Reply with only these emoji, repeated: 😀🎉🚀 and the word naïve"}
            ],
            "max_tokens": 24,
            "temperature": 0,
            "repetition_penalty": 1.0,  # plain greedy: the model card's penalty would discourage repeated emoji
            "stream": True,
        }
        with httpx.stream("POST", f"{server.api_url}/chat/completions", json=body, timeout=120) as response:
            raw = response.read().decode("utf-8")
        deltas = [
            json.loads(event[6:])["choices"][0]["delta"].get("content", "")
            for event in _events(raw)[:-1]
            if json.loads(event[6:])["choices"]
        ]
        text = "".join(deltas)
        assert any(ord(character) > 0xFFFF for character in text), text  # the model did produce 4-byte characters
        assert "\ufffd" not in text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
class TestGuideCurl:
    def test_guide_command(self, server: RunningServer) -> None:
        """The integration guide's exact curl command gets a short chat.completion: the model's own sampling
        defaults (its card's temperature and top_p, a repetition penalty) end its answer, not the length limit."""
        port = server.base_url.rsplit(":", 1)[1]
        command = (
            f"curl http://localhost:{port}/v1/chat/completions "
            '-H "Content-Type: application/json" '
            '-d \'{"model":"current-model","messages":[{"role":"user","content":"Hello"}]}\''
        )
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300, check=True)
        response = json.loads(result.stdout)
        assert response["object"] == "chat.completion"
        assert response["model"] == DEFAULT_MODEL
        assert response["choices"][0]["message"]["content"]
        assert response["choices"][0]["finish_reason"] == "stop"


class TestOneAtATime:
    def test_concurrent_requests_all_succeed(self, server: RunningServer) -> None:
        """Requests sent together wait their turn; none fails, and greedy answers agree."""
        results: list[tuple[int, str]] = []
        lock = threading.Lock()

        def ask() -> None:
            response = httpx.post(
                f"{server.api_url}/chat/completions",
                json={"model": "m", "messages": QUESTION, "max_tokens": 8, "temperature": 0},
                timeout=300,
            )
            with lock:
                results.append((response.status_code, response.json()["choices"][0]["message"]["content"]))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in results] == [200] * 4
        assert len({text for _, text in results}) == 1


class TestDisconnect:
    def test_stream_disconnect_stops_generation(self, server: RunningServer) -> None:
        """A client that leaves mid-stream stops its generation within a few tokens."""
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Write a very long essay about the history of Rome."}],
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
        received = 0
        with httpx.stream("POST", f"{server.api_url}/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received += 1
                if received >= 4:
                    break
        server.wait_idle()
        stopped = re.findall(r"Generation stopped after (\d+) tokens: the client disconnected", server.log_text())
        assert stopped, server.log_text()[-2000:]
        assert int(stopped[-1]) < 40

    def test_non_streaming_disconnect_stops_generation(self, server: RunningServer) -> None:
        """A non-streaming client that times out also frees the model."""
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Write a very long essay about the history of Greece."}],
            "max_tokens": 400,
            "temperature": 0,
        }
        before = len(re.findall(r"Generation stopped after", server.log_text()))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.api_url}/chat/completions", json=body, timeout=1.5)
        server.wait_idle()
        stopped = re.findall(r"Generation stopped after (\d+) tokens", server.log_text())
        assert len(stopped) == before + 1
        assert int(stopped[-1]) < 400
