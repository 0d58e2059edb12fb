"""The guards (Host check, API keys, body size, queue limit) in process, around a tiny ASGI app, as Starlette
tests middleware.

They answer in the error shape of the dialect a path belongs to; the server
tests in test_service.py check the same guards end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mlx_server.dialects.anthropic_messages import ERROR_PATH_PREFIX, anthropic_error
from mlx_server.edge.errors import ErrorShapes
from mlx_server.edge.guards import (
    LOOPBACK_HOSTS,
    ApiKeyGuard,
    BodySizeLimit,
    HostGuard,
    InFlight,
    QueueLimit,
    allowed_hosts,
)
from mlx_server.settings import ApiKeys

KEY = "guard-test-key-1234"
SHAPES = ErrorShapes({ERROR_PATH_PREFIX: anthropic_error})
GENERATION = frozenset({"/v1/chat/completions", "/v1/messages"})


def tiny_app(gate: asyncio.Event | None = None) -> Starlette:
    async def generate(request: Request) -> JSONResponse:
        body = await request.body()
        if gate is not None:
            await gate.wait()
        return JSONResponse({"bytes": len(body)})

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/messages", generate, methods=["POST"]),
            Route("/health", health),
        ]
    )


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guarded")


def request_with_host(app: Any, host: str, path: str = "/v1/chat/completions") -> httpx.Response:
    async def run() -> httpx.Response:
        async with client(app) as http:
            return await http.post(path, content=b"{}", headers={"host": host})

    return asyncio.run(run())


class TestHostCheck:
    """A loopback server answers loopback Host names only: DNS rebinding cannot reach it from a web page."""

    @pytest.mark.parametrize(
        "host", ["localhost", "localhost:8081", "127.0.0.1:8081", "[::1]:8081", "app.localhost", "LOCALHOST"]
    )
    def test_loopback_names_pass(self, host: str) -> None:
        assert request_with_host(HostGuard(tiny_app(), LOOPBACK_HOSTS, SHAPES), host).status_code == 200

    @pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8081", "localhost.attacker.example",
                                      "10.0.0.5:8081", "", "bad host"])  # fmt: skip
    def test_any_other_host_is_a_400_in_the_routes_dialect(self, host: str) -> None:
        guarded = HostGuard(tiny_app(), LOOPBACK_HOSTS, SHAPES)
        response = request_with_host(guarded, host)
        assert response.status_code == 400 and response.json()["error"]["code"] == "host_not_allowed"
        anthropic = request_with_host(guarded, host, "/v1/messages")
        assert anthropic.status_code == 400 and anthropic.json()["error"]["type"] == "invalid_request_error"

    def test_allowed_hosts_add_names_and_a_star_allows_any(self) -> None:
        named = HostGuard(tiny_app(), ["mac.local", "*.internal"], SHAPES)
        assert request_with_host(named, "mac.local:8081").status_code == 200
        assert request_with_host(named, "box.internal").status_code == 200
        assert request_with_host(named, "localhost").status_code == 400
        assert request_with_host(HostGuard(tiny_app(), ["*"], SHAPES), "anything.example").status_code == 200

    @pytest.mark.parametrize(
        ("bind", "configured", "expected"),
        [
            ("127.0.0.1", (), list(LOOPBACK_HOSTS)),
            ("::1", (), list(LOOPBACK_HOSTS)),
            ("localhost", (), list(LOOPBACK_HOSTS)),
            ("0.0.0.0", (), ["*"]),
            ("192.168.1.5", (), ["*"]),
            ("127.0.0.1", ("Mac.local",), ["mac.local"]),
        ],
    )
    def test_the_default_follows_the_bind(self, bind: str, configured: tuple[str, ...], expected: list[str]) -> None:
        assert allowed_hosts(bind, configured) == expected


class TestApiKeys:
    @pytest.fixture
    def guarded(self) -> ApiKeyGuard:
        return ApiKeyGuard(tiny_app(), ApiKeys([KEY, "second-key-5678"]), SHAPES)

    @pytest.mark.parametrize(
        "headers",
        [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}, {"authorization": "bearer second-key-5678"}],
        ids=["bearer", "x-api-key", "second key, lower-case scheme"],
    )
    def test_a_known_key_passes(self, guarded: ApiKeyGuard, headers: dict[str, str]) -> None:
        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.post("/v1/chat/completions", content=b"{}", headers=headers)

        assert asyncio.run(run()).status_code == 200

    @pytest.mark.parametrize(
        ("path", "headers", "shape"),
        [
            ("/v1/chat/completions", {}, "openai"),
            ("/v1/chat/completions", {"x-api-key": "wrong"}, "openai"),
            ("/v1/messages", {"x-api-key": "wrong"}, "anthropic"),
        ],
        ids=["missing", "wrong", "wrong, Anthropic route"],
    )
    def test_no_or_wrong_key_is_a_401_in_the_routes_dialect(
        self, guarded: ApiKeyGuard, path: str, headers: dict[str, str], shape: str
    ) -> None:
        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.post(path, content=b"{}", headers=headers)

        response = asyncio.run(run())
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        if shape == "openai":
            assert response.json()["error"]["code"] == "invalid_api_key"
        else:
            assert response.json()["error"]["type"] == "authentication_error"
        assert KEY not in response.text and "wrong" not in response.text

    def test_a_request_without_the_key_is_refused_before_its_body_is_read(self) -> None:
        """A 100 MB body without a key: the 401 comes after at most about a megabyte of it, and the app sees none."""
        sent: list[int] = []
        seen: list[int] = []

        async def body() -> AsyncIterator[bytes]:
            for _ in range(100):
                sent.append(1)
                yield b"x" * 1024**2

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(1)
            await tiny_app()(scope, receive, send)

        guarded = ApiKeyGuard(BodySizeLimit(app, 200 * 1024**2, SHAPES), ApiKeys([KEY]), SHAPES)

        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.post("/v1/messages", content=body())

        response = asyncio.run(run())
        assert response.status_code == 401 and response.headers["connection"] == "close"
        assert seen == [] and len(sent) <= 3

    def test_health_needs_no_key(self, guarded: ApiKeyGuard) -> None:
        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.get("/health")

        assert asyncio.run(run()).status_code == 200


class TestBodySize:
    @pytest.fixture
    def guarded(self) -> BodySizeLimit:
        return BodySizeLimit(tiny_app(), 1024, SHAPES)

    def test_a_body_within_the_limit_passes(self, guarded: BodySizeLimit) -> None:
        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.post("/v1/chat/completions", content=b"x" * 1024)

        assert asyncio.run(run()).json() == {"bytes": 1024}

    def test_a_declared_length_over_the_limit_is_a_413(self, guarded: BodySizeLimit) -> None:
        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.post("/v1/messages", content=b"x" * 5000)

        response = asyncio.run(run())
        assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"

    def test_a_chunked_body_over_the_limit_is_a_413(self, guarded: BodySizeLimit) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 512

        async def run() -> httpx.Response:
            async with client(guarded) as http:
                return await http.post("/v1/chat/completions", content=chunks())

        response = asyncio.run(run())  # mid-body the guard raises; the app's error handlers shape the answer
        assert response.status_code == 413 and "--max-request-bytes" in response.text


async def fill_the_queue(guarded: QueueLimit, http: httpx.AsyncClient) -> list[asyncio.Task[httpx.Response]]:
    """Two generation requests held in the app: one in the batch (max_batch 1), one waiting (max_waiting 1)."""
    held = [asyncio.create_task(http.post("/v1/chat/completions", content=b"{}")) for _ in range(2)]
    while guarded.in_flight < 2:
        await asyncio.sleep(0.01)
    return held


class TestQueueLimit:
    def test_beyond_a_full_batch_and_the_waiting_room_is_a_429_and_slots_come_back(self) -> None:
        """One decoding (max_batch 1) and one waiting (max_waiting 1): the third is refused; later ones pass."""

        async def run() -> tuple[list[int], httpx.Response, int]:
            gate = asyncio.Event()
            guarded = QueueLimit(tiny_app(gate), max_waiting=1, max_batch=1, paths=GENERATION, shapes=SHAPES)
            async with client(guarded) as http:
                held = await fill_the_queue(guarded, http)
                refused = await http.post("/v1/messages", content=b"{}")
                gate.set()
                statuses = [(await task).status_code for task in held]
                after = await http.post("/v1/chat/completions", content=b"{}")
                return statuses, refused, after.status_code

        statuses, refused, after = asyncio.run(run())
        assert statuses == [200, 200] and after == 200
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"

    def test_other_routes_pass_a_full_queue(self) -> None:
        async def run() -> int:
            gate = asyncio.Event()
            guarded = QueueLimit(tiny_app(gate), max_waiting=1, max_batch=1, paths=GENERATION, shapes=SHAPES)
            async with client(guarded) as http:
                held = await fill_the_queue(guarded, http)
                status = (await http.get("/health")).status_code
                gate.set()
                await asyncio.gather(*held)
                return status

        assert asyncio.run(run()) == 200

    def test_requests_are_counted_without_a_limit_for_the_engine_to_read(self) -> None:
        """With --max-queue 0 nothing is refused, but the in-flight count the engine reads is still kept."""

        async def run() -> tuple[int, list[int], int]:
            gate, counter = asyncio.Event(), InFlight()
            guarded = QueueLimit(
                tiny_app(gate), max_waiting=0, max_batch=1, paths=GENERATION, shapes=SHAPES, counter=counter
            )
            async with client(guarded) as http:
                held = [asyncio.create_task(http.post("/v1/messages", content=b"{}")) for _ in range(3)]
                while counter() < 3:
                    await asyncio.sleep(0.01)
                during = counter()
                gate.set()
                statuses = [(await task).status_code for task in held]
                return during, statuses, counter()

        during, statuses, after = asyncio.run(asyncio.wait_for(run(), timeout=30))
        assert during == 3 and statuses == [200, 200, 200] and after == 0
