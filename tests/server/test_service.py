"""The server as a service: API keys, CORS, body limits, the queue limit, timeouts, keep-alive, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import APIStatusError, AsyncOpenAI, OpenAI

from .conftest import RunningServer, start_server, stop_server
from .helpers import CHAT, DEFAULT_MODEL, LONG_ANSWER, chat_body

pytestmark = pytest.mark.e2e

KEY = "horse-battery-staple-4242"  # not secret-shaped: only its header name can hide it
SECOND_KEY = "second-key-for-ci-1234"
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Keys from the environment, one CORS origin, small limits, full debug output into its own directory."""
    directory = tmp_path_factory.mktemp("guarded")
    running = start_server(
        directory / "server.log",
        {
            "ANYCLAUDE_DEBUG": "3",
            "ANYCLAUDE_DEBUG_DIR": str(directory / "debug"),
            "MLX_SERVER_API_KEY": f"{KEY},{SECOND_KEY}",
        },
        [
            "--cors-origin",
            ORIGIN,
            "--max-request-bytes",
            "64K",
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--keepalive",
            "0.2",
            "--response-cache-size",
            "0",
            "--log-file",
            str(directory / "file.log"),
        ],
    )
    yield running
    stop_server(running)


def authorized(server: RunningServer, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


class TestApiKeys:
    @pytest.mark.parametrize(
        ("headers", "message"),
        [({}, "missing API key"), ({"Authorization": "Bearer wrong-key"}, "incorrect API key")],
        ids=["missing", "wrong"],
    )
    def test_refused_with_openai_401(self, guarded: RunningServer, headers: dict[str, str], message: str) -> None:
        for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/cache")):
            response = httpx.request(method, guarded.base_url + path, headers=headers, json=chat_body())
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and message in error["message"]

    def test_accepted_as_bearer_or_x_api_key_and_every_key_works(self, guarded: RunningServer) -> None:
        for headers in (
            {"Authorization": f"Bearer {KEY}"},
            {"x-api-key": KEY},
            {"Authorization": f"bearer {SECOND_KEY}"},
        ):
            assert httpx.get(guarded.base_url + "/v1/models", headers=headers).status_code == 200

    def test_health_says_only_ready_without_the_key(self, guarded: RunningServer) -> None:
        """A load balancer learns that the server is ready; the model, paths and figures need the key."""
        anonymous = httpx.get(guarded.base_url + "/health")
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
        wrong = httpx.get(guarded.base_url + "/health", headers={"x-api-key": "wrong"})
        assert wrong.json() == {"status": "ok"}
        with authorized(guarded) as client:
            details = client.get("/health").json()
        assert details["status"] == "ok" and {"model", "blas", "queue", "batch", "prompt_cache"} <= set(details)

    def test_the_openai_sdk_sends_it(self, guarded: RunningServer) -> None:
        with OpenAI(base_url=guarded.api_url, api_key=KEY, max_retries=0) as client:
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        assert reply.choices[0].message.content is not None

    def test_a_large_body_without_the_key_is_refused_before_it_is_read(self, guarded: RunningServer) -> None:
        """Headers announcing 100 MB and no key: the 401 comes without the server waiting for the body."""
        host, port = guarded.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(
                f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                "Content-Length: 104857600\r\n\r\n".encode()
            )
            answer = b""
            while b"invalid_api_key" not in answer and (chunk := connection.recv(4096)):
                answer += chunk  # the server closes the connection after its answer
        assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer

    def test_key_never_reaches_a_log_or_file(self, guarded: RunningServer, tmp_path: Path) -> None:
        """At ANYCLAUDE_DEBUG=3, with right and wrong keys, a rejected and a failed request: no trace of a key."""
        with authorized(guarded) as client:
            client.post(CHAT, json=chat_body())
            client.post(CHAT, json={"messages": "not a list"})
        httpx.post(guarded.base_url + CHAT, headers={"x-api-key": KEY + "-wrong"}, json=chat_body())
        directory = guarded.log_path.parent
        texts = {path: path.read_text(errors="replace") for path in directory.rglob("*") if path.is_file()}
        assert any("Processing chat request" in text for text in texts.values()), "the logs were written"
        for path, text in texts.items():
            assert KEY not in text and SECOND_KEY not in text, f"a key leaked into {path}"


class TestHostCheck:
    def test_a_loopback_server_refuses_other_host_names(self, server: RunningServer) -> None:
        """DNS rebinding: a page whose name resolves to 127.0.0.1 cannot drive the API or read /v1/cache."""
        for path in ("/v1/cache", "/v1/models"):
            refused = httpx.get(server.base_url + path, headers={"host": "attacker.example"})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
        refused = httpx.post(server.base_url + CHAT, json=chat_body(), headers={"host": "attacker.example:80"})
        assert refused.status_code == 400
        assert httpx.get(server.base_url + "/v1/models", headers={"host": "localhost:8081"}).status_code == 200


class TestCors:
    def test_allowed_origin_gets_preflight_and_headers(self, guarded: RunningServer) -> None:
        preflight = httpx.options(
            guarded.base_url + CHAT,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        refused = httpx.get(guarded.base_url + "/v1/models", headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN

    def test_other_origins_get_nothing(self, guarded: RunningServer) -> None:
        preflight = httpx.options(
            guarded.base_url + CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in preflight.headers

    def test_default_server_allows_no_origin(self, server: RunningServer) -> None:
        response = httpx.get(server.base_url + "/v1/models", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in response.headers


class TestBodyLimit:
    def test_declared_length_over_the_limit_is_413_before_reading(self, guarded: RunningServer) -> None:
        body = json.dumps(chat_body(user="x" * 70_000)).encode()
        with authorized(guarded) as client:
            response = client.post(CHAT, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "request_too_large"
            assert client.post(CHAT, json=chat_body()).status_code == 200

    def test_chunked_body_over_the_limit_is_413(self, guarded: RunningServer) -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 8192
            yield b'"}]}'

        with authorized(guarded) as client:
            response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413

    def test_an_async_client_still_sending_reads_the_413(self, guarded: RunningServer) -> None:
        """A body far beyond the socket buffers: the client is mid-send when the answer comes, yet reads it."""
        body = json.dumps(chat_body(user="x" * 32_000_000)).encode()

        async def send() -> httpx.Response:
            headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
            async with httpx.AsyncClient(base_url=guarded.base_url, headers=headers, timeout=120) as client:
                return await client.post(CHAT, content=body)

        response = asyncio.run(send())
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

    def test_the_async_openai_sdk_gets_a_413_not_a_connection_error(self, guarded: RunningServer) -> None:
        async def send() -> None:
            async with AsyncOpenAI(base_url=guarded.api_url, api_key=KEY, max_retries=0) as client:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x" * 32_000_000}], max_tokens=1
                )

        with pytest.raises(APIStatusError) as raised:
            asyncio.run(send())
        assert raised.value.status_code == 413
        with authorized(guarded) as client:
            assert client.post(CHAT, json=chat_body()).status_code == 200


class TestQueue:
    def test_a_full_queue_is_429_and_nothing_is_lost(self, guarded: RunningServer) -> None:
        """--max-queue 1: one runs, one waits, the third is refused at once; the first two complete."""
        results: list[int] = []

        def long_request() -> None:
            with authorized(guarded) as client:
                results.append(client.post(CHAT, json=chat_body(LONG_ANSWER, 24)).status_code)

        workers = [threading.Thread(target=long_request) for _ in range(2)]
        for worker in workers:
            worker.start()
        with authorized(guarded) as client:
            for _ in range(200):  # until both are in the server
                queue = client.get("/health").json()["queue"]
                if queue["running"] + queue["waiting"] == 2:
                    break
                threading.Event().wait(0.05)
            refused = client.post(CHAT, json=chat_body())
        for worker in workers:
            worker.join()
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert results == [200, 200]

    def test_disconnected_streams_give_their_slot_back(self, guarded: RunningServer) -> None:
        with authorized(guarded) as client:
            for _ in range(4):
                with client.stream("POST", CHAT, json=chat_body(LONG_ANSWER, 200, stream=True)) as stream:
                    next(stream.iter_lines())
            guarded.wait_idle(api_key=KEY)
            assert client.post(CHAT, json=chat_body()).status_code == 200


class TestKeepAlive:
    def test_comments_while_waiting_for_the_first_token(self, guarded: RunningServer) -> None:
        """A stream queued behind a long request gets SSE comments, then its content, then [DONE]."""
        with authorized(guarded) as client:
            blocker = threading.Thread(target=lambda: authorized(guarded).post(CHAT, json=chat_body(LONG_ANSWER, 40)))
            blocker.start()
            for _ in range(200):
                if client.get("/health").json()["queue"]["running"] == 1:
                    break
                threading.Event().wait(0.05)
            with client.stream("POST", CHAT, json=chat_body(max_tokens=4, stream=True)) as stream:
                lines = [line for line in stream.iter_lines() if line]
            blocker.join()
        first_data = next(index for index, line in enumerate(lines) if '"delta":{"content":' in line)
        assert any(line == ": keep-alive" for line in lines[:first_data])
        assert lines[-1] == "data: [DONE]"


class TestMetrics:
    def test_prometheus_text_with_the_numbers_a_user_wants(self, guarded: RunningServer) -> None:
        with authorized(guarded) as client:
            client.post(CHAT, json=chat_body(max_tokens=3))
            client.post(CHAT, json={"messages": []})
            text = client.get("/metrics").text
            assert client.get("/metrics").headers["content-type"].startswith("text/plain")
        for expected in (
            'mlx_server_requests_total{route="/v1/chat/completions",status="200"}',
            'mlx_server_requests_total{route="/v1/chat/completions",status="400"}',
            "mlx_server_prompt_tokens_total",
            "mlx_server_generated_tokens_total",
            "mlx_server_time_to_first_token_seconds_bucket",
            "mlx_server_time_per_output_token_seconds_bucket",
            f'mlx_server_queue_requests{{model="{DEFAULT_MODEL}",state="waiting"}}',
            f'mlx_server_prompt_cache_lookups_total{{model="{DEFAULT_MODEL}",result="hit"}}',
            "mlx_server_prompt_cache_bytes",
            f'mlx_server_completions_total{{finish_reason="length",model="{DEFAULT_MODEL}"}}',
        ):
            assert expected in text, expected
        counter = f'mlx_server_generated_tokens_total{{model="{DEFAULT_MODEL}"}} '
        generated = next(line for line in text.splitlines() if line.startswith(counter))
        assert float(generated.split()[1]) >= 3

    def test_unknown_paths_do_not_grow_the_labels(self, guarded: RunningServer) -> None:
        with authorized(guarded) as client:
            for index in range(3):
                client.get(f"/scan/{index}")
            text = client.get("/metrics").text
        assert "/scan/" not in text and 'route="other"' in text


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("impatient") / "server.log",
        arguments=["--request-timeout", "1.5", "--response-cache-size", "0"],
    )
    yield running
    stop_server(running)


class TestTimeout:
    def test_runaway_generation_is_a_504(self, impatient: RunningServer) -> None:
        response = httpx.post(impatient.base_url + CHAT, json=chat_body(LONG_ANSWER, 2000), timeout=120)
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
        assert httpx.post(impatient.base_url + CHAT, json=chat_body(), timeout=60).status_code == 200

    def test_runaway_stream_ends_with_an_error_event(self, impatient: RunningServer) -> None:
        body = chat_body(LONG_ANSWER, 2000, stream=True)
        with httpx.stream("POST", impatient.base_url + CHAT, json=body, timeout=120) as stream:
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "request_timeout"
        assert "[DONE]" not in events
        assert any('"content":"' in event for event in events[1:]), "tokens were streamed before the timeout"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server whose prompt cache holds only what the test puts there."""
    running = start_server(tmp_path_factory.mktemp("fresh") / "server.log", arguments=["--response-cache-size", "0"])
    yield running
    stop_server(running)


class TestDisconnectDuringPrefill:
    def test_what_was_computed_before_a_disconnect_is_kept_and_reused(self, fresh: RunningServer) -> None:
        """A client gone as its long prompt starts prefilling: prefill stops between steps, and exactly what it
        computed is stored and read back by the resend (on a machine fast enough to finish first, all of it)."""
        document = " ".join(f"Line {index}: the quick brown fox jumps over the lazy dog." for index in range(64))
        messages = [{"role": "user", "content": f"{document}\nSummarize the text."}]
        body = {"model": "m", "messages": messages, "max_tokens": 3, "temperature": 0, "stream": True}
        fresh.wait_idle()
        with httpx.stream("POST", fresh.base_url + CHAT, json=body, timeout=120) as stream:
            next(stream.iter_lines())  # the headers come when the request is admitted and its prefill begins
        fresh.wait_idle()
        kept = max((entry["tokens"] for entry in httpx.get(fresh.base_url + "/v1/cache").json()["prompt_cache"]
                    ["entries_detail"]), default=0)  # fmt: skip
        reply = httpx.post(fresh.base_url + CHAT, json={**body, "stream": False}, timeout=120).json()
        prompt_tokens = reply["usage"]["prompt_tokens"]
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == min(kept, prompt_tokens - 1) and cached > 0
        if kept < prompt_tokens:
            assert "Generation stopped after 0 tokens: the client disconnected" in fresh.log_text()


class TestGracefulShutdown:
    def test_sigterm_lets_an_in_flight_stream_finish(self, tmp_path: Path) -> None:
        running = start_server(tmp_path / "server.log", arguments=["--response-cache-size", "0"])
        try:
            body = chat_body(LONG_ANSWER, 24, stream=True)
            with httpx.stream("POST", running.base_url + CHAT, json=body, timeout=120) as stream:
                lines = stream.iter_lines()
                seen = [next(lines), next(lines)]
                running.process.send_signal(signal.SIGTERM)
                seen += list(lines)
            assert [line for line in seen if line][-1] == "data: [DONE]"
            assert running.process.wait(timeout=60) == 0
        finally:
            if running.process.poll() is None:
                stop_server(running)
        log = running.log_text()
        assert "Shutting down" in log and "Server stopped" in log and "Traceback" not in log
