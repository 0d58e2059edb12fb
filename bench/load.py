#!/usr/bin/env python3
"""Load and soak: many concurrent clients against one server, for a bounded time.

    make bench-load                                   (60 s, 32 clients, its own server)
    .venv/bin/python bench/load.py --duration 1800    (the 30-minute soak)
    .venv/bin/python bench/load.py --url http://127.0.0.1:8081 --api-key KEY   (a server already running)

Each client loops until the time is up: a random mix of streamed and plain
requests, short and long prompts, 1 to 48 completion tokens, with and without
a shared system prompt (so the prompt cache sees hits and misses).  Every
request must end in a valid completion or a clear 429/503 (the queue limit);
anything else, a hang past the per-request timeout included, is an error.
The server it starts listens on 127.0.0.1 with --max-queue 16.  Resident
memory of the server (from /proc, Linux) is sampled every 10 s; the report
gives requests completed, errors by kind, p50/p95/p99 time to first token (streamed)
and latency (plain), and
memory at start, after warm-up (the first tenth of the run) and at the end.
Exits 1 if any request failed or hung.  It stops itself: --duration bounds it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serverlib import free_port, start_and_wait  # noqa: E402

SYSTEM = "You are a careful coding assistant. Answer in one short paragraph. " * 8
TOPICS = ["sorting", "hash maps", "recursion", "HTTP caching", "unit tests", "git rebase", "memory leaks", "JSON"]
REQUEST_TIMEOUT_SECONDS = 300


@dataclass
class Tally:
    completed: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # 429 / 503: the documented answer to overload
    errors: Counter[str] = field(default_factory=Counter)
    first_token_ms: list[float] = field(default_factory=list)  # streamed requests
    latency_ms: list[float] = field(default_factory=list)  # plain requests, whole reply
    memory_kib: list[tuple[float, int]] = field(default_factory=list)


def _request(rng: random.Random) -> dict[str, object]:
    topic = rng.choice(TOPICS)
    length = rng.choice(["one sentence", "three sentences", "a detailed paragraph with an example"])
    messages: list[dict[str, str]] = [{"role": "user", "content": f"Explain {topic} in {length}."}]
    if rng.random() < 0.7:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {
        "model": "load",
        "messages": messages,
        "max_tokens": rng.randint(1, 48),
        "temperature": rng.choice([0.0, 0.7]),
        "stream": rng.random() < 0.5,
    }


async def _one(client: httpx.AsyncClient, body: dict[str, object], tally: Tally) -> None:
    started = time.perf_counter()
    try:
        if body["stream"]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    _refused(response, tally)
                    return
                first: float | None = None
                done = False
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and first is None and '"content":"' in line and '"role"' not in line:
                        first = time.perf_counter()
                    if '"error"' in line:
                        tally.errors["in-stream error"] += 1
                        return
                    done = done or line == "data: [DONE]"
                if not done:
                    tally.errors["stream ended without [DONE]"] += 1
                    return
                tally.first_token_ms.append(((first or time.perf_counter()) - started) * 1000)
        else:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                _refused(response, tally)
                return
            if response.json()["choices"][0]["message"]["content"] is None:
                tally.errors["empty completion"] += 1
                return
            tally.latency_ms.append((time.perf_counter() - started) * 1000)
        tally.completed += 1
    except httpx.TimeoutException:
        tally.errors[f"hung past {REQUEST_TIMEOUT_SECONDS}s"] += 1
    except (httpx.HTTPError, ValueError, KeyError) as error:
        tally.errors[type(error).__name__] += 1


def _refused(response: httpx.Response, tally: Tally) -> None:
    if response.status_code in (429, 503):
        tally.rejected[str(response.status_code)] += 1
    else:
        tally.errors[f"HTTP {response.status_code}"] += 1


async def _client(base_url: str, headers: dict[str, str], seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_SECONDS) as client:
        while time.monotonic() < stop_at:
            await _one(client, _request(rng), tally)
            if tally.rejected:
                await asyncio.sleep(rng.uniform(0.1, 1.0))  # what a client does with Retry-After


def _resident_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def _sample_memory(pid: int | None, stop_at: float, tally: Tally) -> None:
    started = time.monotonic()
    while True:
        resident = _resident_kib(pid)
        if resident is not None:
            tally.memory_kib.append((time.monotonic() - started, resident))
        if time.monotonic() >= stop_at:
            return
        await asyncio.sleep(min(10.0, max(0.0, stop_at - time.monotonic())))


async def _run(base_url: str, headers: dict[str, str], clients: int, duration: float, pid: int | None) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + duration
    sampler = asyncio.create_task(_sample_memory(pid, stop_at, tally))
    await asyncio.gather(*(_client(base_url, headers, seed, stop_at, tally) for seed in range(clients)))
    await sampler
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--url", help="an already running server (default: start one on a free local port)")
    parser.add_argument("--api-key", default=os.environ.get("MLX_SERVER_API_KEY", "").split(",")[0] or None)
    parser.add_argument("--model", help="--model for the server this starts")
    args = parser.parse_args()

    process: subprocess.Popen[bytes] | None = None
    base_url = args.url
    if base_url is None:
        port = free_port()
        command = [sys.executable, str(ROOT / "scripts" / "mlx-server.py"), "--port", str(port), "--max-queue", "16"]
        command += ["--model", args.model] if args.model else []
        process = start_and_wait(command, f"http://127.0.0.1:{port}/health", env={**os.environ, "ANYCLAUDE_DEBUG": "0"})
        base_url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        started = time.monotonic()
        tally = asyncio.run(_run(base_url, headers, args.clients, args.duration, process.pid if process else None))
        elapsed = time.monotonic() - started
        still_up = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    _report(tally, args.clients, elapsed, still_up)
    sys.exit(1 if tally.errors or not still_up else 0)


def _report(tally: Tally, clients: int, elapsed: float, still_up: bool) -> None:
    print(f"{clients} clients for {elapsed:.0f} s")
    print(f"completed: {tally.completed} ({tally.completed / elapsed:.2f}/s)")
    print(f"refused by the queue limit: {dict(tally.rejected) or 0}")
    print(f"errors: {json.dumps(dict(tally.errors)) if tally.errors else 0}")
    for label, times in (("time to first token, streamed", tally.first_token_ms), ("latency, plain", tally.latency_ms)):
        if len(times) >= 2:
            percentiles = statistics.quantiles(times, n=100, method="inclusive")
            print(f"{label} (ms): p50 {percentiles[49]:.0f}, p95 {percentiles[94]:.0f}, p99 {percentiles[98]:.0f}")
    if tally.memory_kib:
        warm = next((kib for at, kib in tally.memory_kib if at >= elapsed / 10), tally.memory_kib[-1][1])
        start, end = tally.memory_kib[0][1], tally.memory_kib[-1][1]
        print(
            f"server resident memory (MiB): start {start / 1024:.0f}, after warm-up {warm / 1024:.0f}, "
            f"end {end / 1024:.0f}, max {max(kib for _, kib in tally.memory_kib) / 1024:.0f}"
        )
        settled = [kib for at, kib in tally.memory_kib if at >= elapsed / 10]
        if len(settled) >= 10:
            tenth = len(settled) // 10
            early, late = statistics.median(settled[:tenth]), statistics.median(settled[-tenth:])
            print(
                f"after warm-up, median of the first and last tenth (MiB): {early / 1024:.0f} -> {late / 1024:.0f} "
                f"({(late - early) / early:+.1%})"
            )
    print(f"server still healthy: {still_up}")


if __name__ == "__main__":
    main()
