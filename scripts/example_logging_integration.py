#!/usr/bin/env python3
"""Every utils_logging pattern in one runnable script.

Run it at each level to see what each shows:

    ANYCLAUDE_DEBUG=0 python3 scripts/example_logging_integration.py
    ANYCLAUDE_DEBUG=1 python3 scripts/example_logging_integration.py   # + debug lines, cache, an error file
    ANYCLAUDE_DEBUG=2 python3 scripts/example_logging_integration.py   # + timers
    ANYCLAUDE_DEBUG=3 python3 scripts/example_logging_integration.py   # + full data, pretty-printed

At level 1 and above it writes a real error debug file, with the planted API
key and cookie redacted, and prints its path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from utils_logging import (
    PerformanceTimer,
    debug,
    display_debug_startup,
    is_debug_enabled,
    log_cache_hit,
    log_cache_miss,
    log_debug_error,
    request_context,
    setup_logger,
    timing_decorator,
    write_error_debug_file,
)

logger = setup_logger("example")
display_debug_startup()


class ResponseCache:
    """A small LRU response cache keyed by a SHA-256 of the canonical request."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[str, dict[str, object]] = OrderedDict()

    @staticmethod
    def key_for(request: dict[str, object]) -> str:
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def get(self, key: str) -> dict[str, object] | None:
        entry = self.entries.get(key)
        if entry is None:
            log_cache_miss("prompt", key, "not cached yet")
            return None
        self.entries.move_to_end(key)
        log_cache_hit("prompt", key, {"age_seconds": round(time.time() - float(str(entry["stored_at"])), 3)})
        return entry

    def put(self, key: str, response: dict[str, object]) -> None:
        self.entries[key] = {**response, "stored_at": time.time()}
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        debug(2, "Cache put", {"key": key, "cache_size": len(self.entries)})


@timing_decorator(log_level=2)
def fake_inference(prompt: str) -> str:
    """Stands in for a model call."""
    return prompt.upper()


def handle_request(cache: ResponseCache, request: dict[str, object]) -> dict[str, object]:
    """A timer with checkpoints around one request (LOGGING_GUIDE.md, "PerformanceTimer")."""
    with PerformanceTimer("chat_completion", log_level=2) as timer:
        debug(3, "Chat request", request)
        logger.info("Processing chat request")
        timer.checkpoint("request_parsed")

        key = cache.key_for(request)
        cached = cache.get(key)
        timer.checkpoint("cache_check")
        if cached is not None:
            logger.info("Chat request completed successfully (cached)")
            return cached

        answer = fake_inference(str(request["prompt"]))
        timer.checkpoint("inference_complete")
        response: dict[str, object] = {"answer": answer, "timings": timer.as_dict()}
        cache.put(key, response)
        logger.info("Chat request completed successfully")
        return response


def record_failure() -> None:
    """A failed request becomes a redacted debug file (LOGGING_GUIDE.md, "Error debug files")."""
    request_info = {
        "method": "POST",
        "url": "http://localhost:8081/v1/chat/completions",
        "headers": {"authorization": "Bearer sk-example-0123456789abcdef", "cookie": "session=abc123"},
        "body": json.dumps({"model": "current-model", "api_key": "sk-example-body-key"}),
    }
    debug_file = write_error_debug_file(500, request_info, {"statusCode": 500, "body": "model crashed"})
    if debug_file:
        log_debug_error("HTTP", 500, debug_file, {"provider": "mlx", "model": "current"})
        print(f"debug file written: {debug_file}")


async def concurrent_requests() -> None:
    """Request ids keep concurrent tasks' lines apart."""

    async def one(number: int) -> None:
        with request_context(f"req_{number}"):
            async with PerformanceTimer(f"task_{number}") as timer:
                await asyncio.sleep(0)
                timer.checkpoint("halfway")
            debug(1, "task done", lambda: {"number": number, "ms": round(timer.elapsed_ms, 3)})

    await asyncio.gather(one(1), one(2))


def main() -> None:
    cache = ResponseCache()
    request: dict[str, object] = {"model": "current-model", "prompt": "hello", "temperature": 0}
    handle_request(cache, request)
    handle_request(cache, request)
    asyncio.run(concurrent_requests())
    if is_debug_enabled():
        record_failure()


if __name__ == "__main__":
    main()
