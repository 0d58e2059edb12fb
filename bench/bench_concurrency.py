#!/usr/bin/env python3
"""Concurrent clients: this server's batching against mlx_lm.server on the same weights, BLAS and prefill step.

    make bench-concurrency        (or: .venv/bin/python bench/bench_concurrency.py)

Throughput: at 1, 2, 4, 8 and 16 concurrent clients, each client streams
``--requests`` chat completions one after another (a prompt of its own, 48
tokens at temperature 0.7, both servers sampling plainly: no model defaults,
no penalty); aggregate tokens/s is every completion token over the wall time
of the level, and the median time to first token is over all of its requests.
Both servers run at once and levels alternate between them, so machine noise
hits both alike.  Both keep their prompt caches (mlx_lm.server's cannot be
turned off): the prompts differ, but every one begins with the chat template's
default system prompt, which both reuse; this server's answer cache is off.
Before the levels, each server answers one untimed first request (its
one-time costs: mlx_lm.server, for one, reads its weights lazily), after
both have had a few seconds to settle: measured, a first request sent while
the other server had just started took ~0.35 s longer than one sent after.
Those first requests' times to first token are printed apart.

Agent fan-out: 4 conversations at once that share a 2,000-token system prompt
with tools (Claude Code's subagents), 4 turns each ending in a tool result,
16-token replies, caches on for both; total wall time and median time to first
token.

Targets: throughput at least 1.0x mlx_lm.server's from 2 clients up and 0.95x
at 1 client, at least 3x this server's own 1-client throughput at 8 clients;
fan-out total time and median TTFT at most 0.5x mlx_lm.server's.  Exits 1 if a
target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from bench_cache import TOOLS, system_prompt

from serverlib import StreamedReply, mlx_lm_server, our_server, stream_chat

ROOT = Path(__file__).resolve().parent.parent
PREFILL_STEP = "256"  # this server's step on CPU; mlx_lm.server is given the same
SETTLE_SECONDS = 8  # after both servers answer, before the first request
# mlx_lm.server samples plainly (no model defaults, no penalty): this server is asked to do the same work.
SAME_SAMPLING = ["--generation-config", "none"]
LEVELS = (1, 2, 4, 8, 16)
TOPICS = ["a lighthouse", "a dragon", "the sea", "a robot", "a garden", "winter", "a city", "a violin",
          "a desert", "a train", "the moon", "a forest", "a bakery", "a storm", "a library", "a river"]  # fmt: skip
FANOUT_TASKS = [
    "Find why the parser test fails.",
    "Add a --verbose flag to the CLI.",
    "Find where the cache grows without bound.",
    "List the modules without tests.",
]


@dataclass
class Level:
    server: str
    clients: int
    seconds: float
    tokens: int
    ttfts_ms: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def median_ttft_ms(self) -> float:
        return statistics.median(self.ttfts_ms)


def _concurrently(workers: int, work: Callable[[int], list[StreamedReply]]) -> tuple[float, list[StreamedReply]]:
    replies: list[StreamedReply] = []
    lock = threading.Lock()
    errors: list[Exception] = []

    def run(index: int) -> None:
        try:
            mine = work(index)
        except Exception as error:  # noqa: BLE001 - every failure is reported after the join
            errors.append(error)
            return
        with lock:
            replies.extend(mine)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(workers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, replies


def first_request(url: str) -> float:
    """A server's first request, which pays its one-time costs: its time to first token (ms)."""
    body = {"model": "default_model", "messages": [{"role": "user", "content": "Write a short story about a kite."}],
            "max_tokens": 4, "temperature": 0.7, "top_p": 1.0}  # fmt: skip
    with httpx.Client(base_url=url, timeout=1800) as http:
        return stream_chat(http, body).time_to_first_token_ms


def throughput(name: str, url: str, clients: int, requests: int, max_tokens: int, round_: int) -> Level:
    def client(index: int) -> list[StreamedReply]:
        replies = []
        with httpx.Client(base_url=url, timeout=1800) as http:
            for number in range(requests):
                topic = TOPICS[index % len(TOPICS)]
                content = f"Write a short story about {topic} (story {round_}.{index}.{number})."
                body = {"model": "default_model", "messages": [{"role": "user", "content": content}],
                        "max_tokens": max_tokens, "temperature": 0.7, "top_p": 1.0}  # fmt: skip
                replies.append(stream_chat(http, body))
        return replies

    seconds, replies = _concurrently(clients, client)
    tokens = sum(int(reply.usage.get("completion_tokens", 0)) for reply in replies)
    level = Level(name, clients, seconds, tokens, [reply.time_to_first_token_ms for reply in replies])
    print(
        f"  {name:>14} x{clients:<2}: {tokens} tokens in {seconds:.1f} s = {level.tokens_per_second:.1f} tok/s, "
        f"median TTFT {level.median_ttft_ms:.0f} ms",
        flush=True,
    )
    return level


def fanout(name: str, url: str, turns: int, max_tokens: int) -> Level:
    """Four conversations at once over one system prompt with tools; every turn ends in a tool result."""
    system = system_prompt()
    [{"type": "function", "function": tool} for tool in TOOLS]

    def conversation(index: int) -> list[StreamedReply]:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": FANOUT_TASKS[index]},
        ]
        replies = []
        said = ""  # the model's last reply, which an agent keeps as the text of its next call
        with httpx.Client(base_url=url, timeout=1800) as http:
            for turn in range(1, turns + 1):
                path = f"src/module_{index}_{turn}.py"
                call = {"id": f"call_{index}_{turn}", "type": "function",
                        "function": {"name": "read_file", "arguments": f'{{"path": "{path}"}}'}}  # fmt: skip
                result = "\n".join(f"{line:4d}  def handler_{turn}_{line}(request): return {line}" for line in range(5))
                messages += [
                    {"role": "assistant", "content": said, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": f"{path}:\n{result}"},
                ]
                body = {"model": "default_model", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
                reply = stream_chat(http, body)
                replies.append(reply)
                said = reply.text
        return replies

    seconds, replies = _concurrently(len(FANOUT_TASKS), conversation)
    tokens = sum(int(reply.usage.get("completion_tokens", 0)) for reply in replies)
    level = Level(name, len(FANOUT_TASKS), seconds, tokens, [reply.time_to_first_token_ms for reply in replies])
    print(f"  {name:>14} fan-out: {seconds:.1f} s, median TTFT {level.median_ttft_ms:.0f} ms", flush=True)
    return level


def report(ours: list[Level], theirs: list[Level], fan: tuple[Level, Level] | None) -> bool:
    print(
        "\n| clients | this server (tok/s) | mlx_lm.server (tok/s) | ratio | TTFT median (ms): this | mlx_lm.server |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for mine, other in zip(ours, theirs):
        ratio = mine.tokens_per_second / other.tokens_per_second
        print(
            f"| {mine.clients} | {mine.tokens_per_second:.1f} | {other.tokens_per_second:.1f} | {ratio:.2f}x | "
            f"{mine.median_ttft_ms:,.0f} | {other.median_ttft_ms:,.0f} |"
        )
    checks: list[tuple[str, float, str, bool]] = []
    for mine, other in zip(ours, theirs):
        ratio = mine.tokens_per_second / other.tokens_per_second
        floor = 0.95 if mine.clients == 1 else 1.0
        checks.append((f"throughput / mlx_lm.server at {mine.clients} clients", ratio, f">= {floor}", ratio >= floor))
    single = next((level for level in ours if level.clients == 1), None)
    eight = next((level for level in ours if level.clients == 8), None)
    if single and eight:
        scaling = eight.tokens_per_second / single.tokens_per_second
        checks.append(("own throughput at 8 clients / at 1 client", scaling, ">= 3", scaling >= 3))
    if fan is not None:
        mine_fan, other_fan = fan
        print(
            f"\nAgent fan-out: this server {mine_fan.seconds:.1f} s total,"
            f" median TTFT {mine_fan.median_ttft_ms:,.0f} ms;"
            f" mlx_lm.server {other_fan.seconds:.1f} s, {other_fan.median_ttft_ms:,.0f} ms"
        )
        total = mine_fan.seconds / other_fan.seconds
        ttft = mine_fan.median_ttft_ms / other_fan.median_ttft_ms
        checks.append(("fan-out total time / mlx_lm.server", total, "<= 0.5", total <= 0.5))
        checks.append(("fan-out median TTFT / mlx_lm.server", ttft, "<= 0.5", ttft <= 0.5))
    print("\n| target | measured | bound | |\n|---|---:|---:|---|")
    for label, value, bound, met in checks:
        print(f"| {label} | {value:.2f} | {bound} | {'met' if met else 'MISSED'} |")
    return all(met for *_, met in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="client counts (default 1,2,4,8,16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default 48)")
    parser.add_argument("--skip-fanout", action="store_true", help="only the throughput levels")
    parser.add_argument("--only-fanout", action="store_true", help="only the agent fan-out run")
    parser.add_argument("--server-args", default="", help="extra arguments for this server, e.g. '--max-batch 8'")
    arguments = parser.parse_args()
    levels = [] if arguments.only_fanout else [int(level) for level in arguments.levels.split(",")]
    extra = arguments.server_args.split()
    ours: list[Level] = []
    theirs: list[Level] = []
    fan = None
    with ExitStack() as servers:
        if levels:
            print("Starting both servers (mlx_lm.server on the exported default weights)...", flush=True)
            cold = servers.enter_context(our_server(ROOT, ["--response-cache-size", "0", *SAME_SAMPLING, *extra]))
            reference = servers.enter_context(mlx_lm_server(ROOT, ["--prefill-step-size", PREFILL_STEP]))
            time.sleep(SETTLE_SECONDS)
            for name, url in (("this server", cold), ("mlx_lm.server", reference)):
                first = first_request(url)
                print(f"  {name:>14} first request (untimed in the levels): time to first token {first:.0f} ms")
        for round_, clients in enumerate(levels):
            ours.append(throughput("this server", cold, clients, arguments.requests, arguments.max_tokens, round_))
            theirs.append(
                throughput("mlx_lm.server", reference, clients, arguments.requests, arguments.max_tokens, round_)
            )
    if not arguments.skip_fanout:
        with our_server(ROOT, ["--response-cache-size", "0", *SAME_SAMPLING, *extra]) as warm:
            mine_fan = fanout("this server", warm, 4, 16)
        with mlx_lm_server(ROOT, ["--prefill-step-size", PREFILL_STEP]) as reference:
            other_fan = fanout("mlx_lm.server", reference, 4, 16)
        fan = (mine_fan, other_fan)
    sys.exit(0 if report(ours, theirs, fan) else 1)


if __name__ == "__main__":
    main()
