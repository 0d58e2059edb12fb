#!/usr/bin/env python3
"""An agent session's cache under pressure: per-session lanes against one global LRU, in one run.

    make bench-sessions        (or: .venv/bin/python bench/bench_sessions.py)

Workload, shaped like a Claude Code session on /v1/messages: a main
conversation of 10 turns on a ~3k-token system prompt; between its turns,
3 subagent conversations (their own ~1.5k-token prompts, 2 turns each) and 5
side requests (a title, summaries: one-off, ~600 tokens).  The prompt cache
is bounded to about three conversations' KV bytes (``--conversations``), so
something must go.

Run twice on the default model, one server each: with the session headers
Claude Code sends (``X-Claude-Code-Session-Id``, and ``X-Claude-Code-Agent-Id``
for subagents), and without them (every request in one global LRU, as before
lanes: the baseline).  Then, on the first server, a ~6k-token prompt is
cancelled at about half its prefill and sent again: the resend starts from
what was computed.

Returning sessions: a conversation that comes back every turn (its own
session id, a ~1.3k-token system prompt, six turns) with, between its turns,
three one-off sessions (distinct session ids, ~1.3k-token prompts of their
own, each seen once), under a prompt cache of 210 MB (about 4.5k tokens of the
default model: a bit more than three of their prompts).  Run with the session
headers, and without them (one global LRU).

Targets: with lanes, every main turn from the second reads at least 90% of
its prompt from the cache, and each subagent's second turn at least 80%; the
resend's time to first token at most 0.6x a cold request's; in the returning
case every main turn from the second reads at least 90% too.  Exits 1 if one
is missed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serverlib import our_server, report_targets, stream_messages

ROOT = Path(__file__).resolve().parent.parent
BYTES_PER_TOKEN = 46080  # the default model's KV bytes per token (the start-up line says so)
CACHE_CONVERSATIONS = 3
MAIN_TURNS = 10
REPLY_TOKENS = 24
MAIN_TARGET, SUBAGENT_TARGET, RESEND_TARGET = 0.90, 0.80, 0.6


def words(topic: str, count: int) -> str:
    """About ``count`` tokens of text on ``topic`` (different topics share no prefix)."""
    sentence = f"The {topic} notes say that each module has one job and its tests read as specifications. "
    return sentence * max(1, count // 18)


@dataclass
class Conversation:
    """One conversation's history and the share of each turn's prompt read from the cache."""

    name: str
    system: str
    headers: dict[str, str]
    messages: list[dict[str, Any]] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)

    def turn(self, client: httpx.Client, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        body = {"model": "local", "system": self.system, "messages": self.messages, "max_tokens": REPLY_TOKENS,
                "temperature": 0.0}  # fmt: skip
        reply = stream_messages(client, body, self.headers)
        usage = reply.usage
        prompt = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
        self.shares.append(usage["cache_read_input_tokens"] / prompt)
        self.messages.append({"role": "assistant", "content": reply.text or "OK."})


def session(client: httpx.Client, with_headers: bool) -> tuple[Conversation, list[Conversation]]:
    """The main conversation with its subagents and side requests interleaved; returns them."""
    session_id = "5f0c-bench-session"

    def headers(agent: str | None = None) -> dict[str, str]:
        if not with_headers:
            return {}
        return {"x-claude-code-session-id": session_id, **({"x-claude-code-agent-id": agent} if agent else {})}

    main = Conversation("main", words("repository", 3000), headers())
    subagents = [Conversation(f"subagent {n}", words(f"subagent {n} search", 1500), headers(f"agent-{n}"))
                 for n in range(3)]  # fmt: skip

    def side(kind: str) -> None:
        Conversation(kind, words(f"{kind} instructions", 500), headers()).turn(client, words(f"{kind} input", 100))

    # Between main turns: (turn index -> what runs after it).
    between: dict[int, list[Any]] = {
        0: [lambda: side("title")],
        2: [lambda: subagents[0].turn(client, words("task zero", 150)),
            lambda: subagents[1].turn(client, words("task one", 150)),
            lambda: side("summary"),
            lambda: subagents[2].turn(client, words("task two", 150))],
        3: [lambda: subagents[0].turn(client, words("result zero", 150)),
            lambda: subagents[1].turn(client, words("result one", 150)),
            lambda: subagents[2].turn(client, words("result two", 150)),
            lambda: side("summary again")],
        5: [lambda: side("probe")],
        7: [lambda: side("recap")],
    }  # fmt: skip
    for turn in range(MAIN_TURNS):
        main.turn(client, words(f"step {turn} of the task", 170))
        for run in between.get(turn, []):
            run()
    return main, subagents


RETURNING_CACHE_BYTES = 210 * 10**6
RETURNING_TURNS, ONE_OFFS_BETWEEN = 6, 3


def returning(client: httpx.Client, with_headers: bool) -> Conversation:
    """A conversation that returns every turn, with one-off sessions between its turns; returns it."""

    def headers(session: str) -> dict[str, str]:
        return {"x-claude-code-session-id": session} if with_headers else {}

    main = Conversation("returning", words("returning conversation", 1300), headers("11111111-main"))
    for turn in range(RETURNING_TURNS):
        main.turn(client, words(f"turn {turn} of the returning conversation", 100))
        for one_off in range(ONE_OFFS_BETWEEN):
            name = f"one-off {turn}.{one_off}"
            Conversation(name, words(name, 1300), headers(f"2222-{turn}-{one_off}")).turn(client, words(name, 60))
    return main


def send_and_leave(url: str, body: dict[str, Any], after_seconds: float) -> None:
    """POST a streaming request on a raw connection and close it after ``after_seconds``: a client giving up."""
    address = httpx.URL(url)
    payload = json.dumps({**body, "stream": True}).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((address.host, address.port or 80)) as connection:
        connection.sendall(head + payload)
        time.sleep(after_seconds)


def cancelled_prefill(client: httpx.Client) -> tuple[float, float]:
    """(cold TTFT, resend TTFT) in ms for a ~6k-token prompt whose first send is cut at half its prefill."""
    cold = stream_messages(client, {"model": "local", "max_tokens": 4, "temperature": 0.0,
                                    "messages": [{"role": "user", "content": words("cold", 6000)}]})  # fmt: skip
    body = {"model": "local", "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": words("cancelled", 6000)}]}  # fmt: skip
    send_and_leave(str(client.base_url), body, cold.time_to_first_token_ms / 1000 / 2)
    time.sleep(1.0)
    resend = stream_messages(client, body)
    return cold.time_to_first_token_ms, resend.time_to_first_token_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=float, default=CACHE_CONVERSATIONS,
                        help="the prompt cache bound in conversations of 4,000 tokens (targets are for 3)")  # fmt: skip
    conversations = parser.parse_args().conversations
    budget = int(conversations * 4000 * BYTES_PER_TOKEN)
    arguments = ["--prompt-cache-bytes", str(budget), "--response-cache-size", "0"]
    results: dict[str, tuple[Conversation, list[Conversation]]] = {}
    resend: tuple[float, float] | None = None
    for label, with_headers in (("lanes (session headers)", True), ("global LRU (no headers)", False)):
        with our_server(ROOT, arguments) as url, httpx.Client(base_url=url, timeout=600) as client:
            results[label] = session(client, with_headers)
            if with_headers:
                resend = cancelled_prefill(client)
    print(f"prompt cache bound: {budget / 2**20:.0f} MiB (about {conversations:g} conversations)\n")
    print(f"{'':<26} {'main turns 2-10 cached share':<52} {'min':>5}  subagents' 2nd turns")
    for label, (main_conversation, subagents) in results.items():
        shares = " ".join(f"{share:.2f}" for share in main_conversation.shares[1:])
        second = " ".join(f"{agent.shares[1]:.2f}" for agent in subagents)
        print(f"{label:<26} {shares:<52} {min(main_conversation.shares[1:]):>5.2f}  {second}")
    missed = []
    main_conversation, subagents = results["lanes (session headers)"]
    if min(main_conversation.shares[1:]) < MAIN_TARGET:
        missed.append(f"a main turn read {min(main_conversation.shares[1:]):.2f} < {MAIN_TARGET}")
    if min(agent.shares[1] for agent in subagents) < SUBAGENT_TARGET:
        missed.append(f"a subagent's second turn read {min(a.shares[1] for a in subagents):.2f} < {SUBAGENT_TARGET}")
    assert resend is not None
    cold, again = resend
    ratio = again / cold
    print(f"\ncancelled at half its prefill, then resent: TTFT {again:.0f} ms vs cold {cold:.0f} ms = {ratio:.2f}x")
    if ratio > RESEND_TARGET:
        missed.append(f"resend TTFT {ratio:.2f}x cold > {RESEND_TARGET}")
    median_gain = statistics.median(main_conversation.shares[1:]) - statistics.median(
        results["global LRU (no headers)"][0].shares[1:]
    )
    print(f"median main-turn share, lanes minus global LRU: {median_gain:+.2f}")
    missed += returning_case()
    return report_targets(missed)


def returning_case() -> list[str]:
    """The returning conversation among one-off sessions, with and without lanes; the targets it missed."""
    arguments = ["--prompt-cache-bytes", str(RETURNING_CACHE_BYTES), "--response-cache-size", "0"]
    print(f"\nreturning conversation, {ONE_OFFS_BETWEEN} one-off sessions between its turns, prompt cache "
          f"{RETURNING_CACHE_BYTES / 10**6:.0f} MB")  # fmt: skip
    print(f"{'':<26} {'main turns 2-' + str(RETURNING_TURNS) + ' cached share':<40} {'min':>5}")
    shares: dict[str, list[float]] = {}
    for label, with_headers in (("lanes (session headers)", True), ("global LRU (no headers)", False)):
        with our_server(ROOT, arguments) as url, httpx.Client(base_url=url, timeout=600) as client:
            shares[label] = returning(client, with_headers).shares[1:]
        print(f"{label:<26} {' '.join(f'{share:.2f}' for share in shares[label]):<40} {min(shares[label]):>5.2f}")
    lowest = min(shares["lanes (session headers)"])
    return [f"a returning main turn read {lowest:.2f} < {MAIN_TARGET}"] if lowest < MAIN_TARGET else []


if __name__ == "__main__":
    sys.exit(main())
