"""Every route of the server's own OpenAPI schema, fuzzed by schemathesis: no 5xx, no traceback, still healthy.

The real application (guards, dialects, chat core) over the scripted engine,
in-process: an open server (schemathesis's coverage cases and fuzzed ones),
and one with an API key, called with and without it (fuzzed cases).
Hypothesis runs derandomized here, so CI fails only on a real change;
``make fuzz`` runs many more examples, randomized, to hunt for new cases.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.types import ASGIApp

from mlx_server.settings import ApiKeys, Settings

from .scripted import scripted_server

KEY = "fuzz-key-4321"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))


def app(keys: tuple[str, ...] = ()) -> ASGIApp:
    configured = Settings(default_temperature=0.0, response_cache_size=0, allowed_hosts=("testserver",),
                          api_keys=ApiKeys(keys))  # fmt: skip
    return scripted_server(configured).client.app


OPEN = app()
KEYED = app((KEY,))
open_schema = schemathesis.openapi.from_asgi("/openapi.json", OPEN)
keyed_schema = schemathesis.openapi.from_asgi("/openapi.json", KEYED, headers={"authorization": f"Bearer {KEY}"})
# The coverage phase's cases (every boundary and negative value the schema defines, ~10k, built at collection in
# every worker) run against the open server; the keyed one serves the same routes behind a key: fuzzed cases only.
keyed_schema.config.phases.update(phases=["examples", "fuzzing"])
fuzzing = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def answered_without_a_server_error(response: object) -> None:
    status = getattr(response, "status_code", 0)
    text = getattr(response, "text", "")
    assert status < 500, f"{status}: {text[:500]}"
    assert "Traceback" not in text and 'File "' not in text


@open_schema.parametrize()
@fuzzing
def test_an_open_server(case: schemathesis.Case[Any]) -> None:
    answered_without_a_server_error(case.call())


@keyed_schema.parametrize()
@fuzzing
def test_a_keyed_server_with_its_key(case: schemathesis.Case[Any]) -> None:
    answered_without_a_server_error(case.call(headers={"authorization": f"Bearer {KEY}"}))


@keyed_schema.parametrize()
@fuzzing
def test_a_keyed_server_without_its_key(case: schemathesis.Case[Any]) -> None:
    response = case.call(headers={"authorization": "Bearer wrong"})
    answered_without_a_server_error(response)
    if case.path not in ("/", "/health"):
        assert response.status_code == 401


@pytest.mark.parametrize("served", [OPEN, KEYED], ids=["open", "keyed"])
def test_each_server_is_healthy_after(served: ASGIApp) -> None:
    from starlette.testclient import TestClient

    client = TestClient(served, base_url="http://testserver", headers={"authorization": f"Bearer {KEY}"})
    assert client.get("/health").json()["status"] == "ok"
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
