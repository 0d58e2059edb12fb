"""What stands between the network and the routes: the Host check, API keys, body size, and the queue limit.

Each is a small ASGI middleware, so that it works the same for plain and
streamed responses and answers before a body is read:

* ``HostGuard``: a server bound to a loopback address answers only requests
  whose ``Host`` is a loopback name (or one of ``--allowed-host``); any web
  page the user opens could otherwise reach it through a name that resolves
  to 127.0.0.1 (DNS rebinding: Ollama's CVE-2024-28224).  Starlette's
  ``TrustedHostMiddleware`` decides; the refusal is a 400 in the dialect's shape.
* ``ApiKeyGuard``: with keys configured, every route but ``/health`` and
  ``/`` (Claude Code's ``HEAD /`` probe) needs ``Authorization: Bearer <key>``
  or ``x-api-key: <key>``; a missing or wrong key is a 401.  ``/health``
  answers anyone whether the server is ready, and its details only to a
  request that carries a key (``AUTHENTICATED`` in the request's state).
  Keys are compared in constant time and never logged.  It stands outside
  the body limit: a request without the key is refused before its body is
  read (at most ``REFUSED_DRAIN_BYTES`` of it, so the client sees the 401).
* ``ModelControlGuard``: ``POST /models/load`` and ``/models/unload`` change
  what every client is served, so an operator can turn them off
  (``--model-control off``: 403) or put them behind admin keys
  (``--admin-key``, sent as ``X-Admin-Key``: the API keys alone do not open them).
* ``BodySizeLimit``: a body over ``--max-request-bytes`` is a 413, from its
  Content-Length before anything is processed, or as soon as a chunked body
  passes the limit.  The rest of the body is read and discarded first
  (bounded in bytes and time): a client that is still sending when the
  answer comes and the connection closes would see a reset instead of the
  413 (async clients such as httpx.AsyncClient always do).
* ``QueueLimit``: at most ``--max-queue`` generation requests wait beyond a
  full batch (``--max-batch``); the next gets a 429 with Retry-After.
  Counting happens around the whole request, streaming included (``InFlight``,
  which the engine also reads), so a slot is
  always given back.

Each answers in the error shape of the dialect its path belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Collection, Sequence

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_server.dialects.errors import APIError
from mlx_server.edge.errors import ErrorShapes
from mlx_server.settings import ApiKeys

__all__ = [
    "AUTHENTICATED",
    "LOOPBACK_HOSTS",
    "OPEN_PATHS",
    "ApiKeyGuard",
    "BodySizeLimit",
    "HostGuard",
    "InFlight",
    "ModelControlGuard",
    "QueueLimit",
    "allowed_hosts",
    "is_loopback",
    "model_control_refusal",
]

logger = logging.getLogger("mlx")

OPEN_PATHS = frozenset({"/health", "/"})
AUTHENTICATED = "authenticated"  # the request's state: it carried a valid key, or none is required
LOOPBACK_HOSTS = ("localhost", "*.localhost", "127.0.0.1", "[::1]")
REFUSED_DRAIN_BYTES = 1024**2  # what is read of a refused request's body, so that its client hears the refusal
REFUSED_DRAIN_SECONDS = 2.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what the server binds to) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, configured: Sequence[str]) -> list[str]:
    """The Host names served: ``--allowed-host`` when given, the loopback names on a loopback bind, else any."""
    if configured:
        return [host.strip().lower() for host in configured if host.strip()]
    return list(LOOPBACK_HOSTS) if is_loopback(bind) else ["*"]


async def _send_error(scope: Scope, receive: Receive, send: Send, shapes: ErrorShapes, error: APIError) -> None:
    await shapes.response(scope["path"], error)(scope, receive, send)


class HostGuard:
    """Requests whose ``Host`` is not among ``hosts`` get a 400 (Starlette's matching: names, ``*.domain``, ``*``)."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str], shapes: ErrorShapes) -> None:
        self.app = app
        self.shapes = shapes
        self.hosts = list(hosts)
        self._matcher = TrustedHostMiddleware(self._passed, allowed_hosts=self.hosts, www_redirect=False)

    async def _passed(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["mlx_server.host_passed"] = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.hosts:
            await self.app(scope, receive, send)
            return

        async def swallow(_: Message) -> None:
            """Starlette's own plain-text refusal: replaced by the dialect's below."""

        await self._matcher(scope, receive, swallow)
        if scope.pop("mlx_server.host_passed", False):
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        logger.warning("Refused %s %s: Host %r is not served here (--allowed-host)", scope["method"], scope["path"],
                       host[:80])  # fmt: skip
        message = (
            f"the Host header {host[:80]!r} is not served here: this server answers {', '.join(self.hosts)} "
            "(start it with --allowed-host to add a name)"
        )
        error = APIError(400, message, code="host_not_allowed", headers={"Connection": "close"})
        await _send_error(scope, receive, send, self.shapes, error)


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, keys: ApiKeys, shapes: ErrorShapes) -> None:
        self.app = app
        self.keys = keys
        self.shapes = shapes

    def _offered_key(self, scope: Scope) -> str | None:
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        if authorization is not None and authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        return headers.get("x-api-key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = self._offered_key(scope) if self.keys else None
        authenticated = not self.keys or (offered is not None and self.keys.accepts(offered))
        scope.setdefault("state", {})[AUTHENTICATED] = authenticated
        if authenticated or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send it as 'Authorization: Bearer <key>'"
            if offered is None
            else "incorrect API key provided"
        )
        logger.warning("Refused %s %s: %s", scope["method"], scope["path"], message)  # never the key itself
        await _drain(receive, REFUSED_DRAIN_BYTES, REFUSED_DRAIN_SECONDS)
        headers = {"WWW-Authenticate": "Bearer", "Connection": "close"}
        error = APIError(401, message, code="invalid_api_key", headers=headers)
        await _send_error(scope, receive, send, self.shapes, error)


def model_control_refusal(headers: Headers, enabled: bool, admin_keys: ApiKeys) -> str | None:
    """Why a request may not load or unload models (None: it may): --model-control, then the admin key."""
    if not enabled:
        return "loading and unloading models by request is turned off on this server (--model-control off)"
    if not admin_keys:
        return None
    offered = headers.get("x-admin-key")
    if offered is not None and admin_keys.accepts(offered):
        return None
    if offered is None:
        return "loading and unloading models needs the admin key: send it as 'X-Admin-Key: <key>'"
    return "incorrect admin key provided"


class ModelControlGuard:
    def __init__(self, app: ASGIApp, paths: Collection[str], enabled: bool, admin_keys: ApiKeys,
                 shapes: ErrorShapes) -> None:  # fmt: skip
        self.app = app
        self.paths = paths
        self.enabled = enabled
        self.admin_keys = admin_keys
        self.shapes = shapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        message = model_control_refusal(Headers(scope=scope), self.enabled, self.admin_keys)
        if message is None:
            await self.app(scope, receive, send)
            return
        logger.warning("Refused %s %s: %s", scope["method"], scope["path"], message)
        await _drain(receive, REFUSED_DRAIN_BYTES, REFUSED_DRAIN_SECONDS)
        error = APIError(403, message, error_type="permission_error", code="model_control_refused")
        await _send_error(scope, receive, send, self.shapes, error)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, shapes: ErrorShapes) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.shapes = shapes

    def _message(self) -> str:
        return f"the request body is larger than this server accepts ({self.max_bytes} bytes, --max-request-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            logger.warning(
                "Refused a %s-byte body on %s (--max-request-bytes %d)", declared, scope["path"], self.max_bytes
            )
            await _drain(receive)
            error = APIError(413, self._message(), code="request_too_large", headers={"Connection": "close"})
            await _send_error(scope, receive, send, self.shapes, error)
            return
        received = 0
        body_done = False

        async def counting_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 413 and not body_done:
                await _drain(receive)
            await send(message)

        await self.app(scope, counting_receive, draining_send)


DRAIN_MAX_BYTES = 512 * 1024**2
DRAIN_MAX_SECONDS = 30.0


async def _drain(receive: Receive, max_bytes: int = DRAIN_MAX_BYTES, max_seconds: float = DRAIN_MAX_SECONDS) -> None:
    """Read and discard what is left of a request body, up to ``max_bytes`` and ``max_seconds``."""
    drained = 0
    deadline = asyncio.get_running_loop().time() + max_seconds
    with contextlib.suppress(asyncio.TimeoutError):
        while drained < max_bytes:
            remaining = deadline - asyncio.get_running_loop().time()
            message = await asyncio.wait_for(receive(), timeout=max(0.0, remaining))
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class InFlight:
    """Generation requests inside the server, from their headers to their last byte.

    QueueLimit counts them; the engine reads the count to tell a burst whose
    requests are still being parsed (worth gathering into one prefill) from a
    lone request (started at once).
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


class QueueLimit:
    def __init__(
        self,
        app: ASGIApp,
        max_waiting: int,
        max_batch: int,
        paths: Collection[str],
        shapes: ErrorShapes,
        counter: InFlight | None = None,
    ) -> None:
        self.app = app
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self.paths = paths
        self.shapes = shapes
        self.counter = counter if counter is not None else InFlight()

    @property
    def in_flight(self) -> int:
        return self.counter.count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limited = scope["type"] == "http" and scope["path"] in self.paths and scope["method"] == "POST"
        if not limited:
            await self.app(scope, receive, send)
            return
        if self.max_waiting and self.in_flight >= self.max_batch + self.max_waiting:  # a full batch, max_waiting more
            message = (
                f"the server is busy: {self.max_waiting} requests are already waiting (--max-queue); retry shortly"
            )
            logger.warning("Refused a chat request: %d already waiting (--max-queue)", self.max_waiting)
            error = APIError(429, message, error_type="server_error", code="queue_full", headers={"Retry-After": "1"})
            await _send_error(scope, receive, send, self.shapes, error)
            return
        self.counter.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.count -= 1
