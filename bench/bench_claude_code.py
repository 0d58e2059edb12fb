#!/usr/bin/env python3
"""A Claude Code-shaped conversation through /v1/messages and the same one through /v1/chat/completions.

    make bench-claude-code        (or: .venv/bin/python bench/bench_claude_code.py)

The workload is what Claude Code sends: a system prompt of more than 2,000
tokens in blocks (the rotating ``x-anthropic-billing-header`` line first, and
``cache_control`` on the last block), six tool definitions, a first user
message that starts with Claude Code's ``<system-reminder>`` context (the date
and a project's CLAUDE.md, about 500 tokens), and a conversation whose every
turn ends in a tool result (a call to read a file and its five lines, about
150 new tokens a turn), with ``cache_control`` moving to the newest block each
turn.  The same conversation, turn for turn, goes through
OpenAI's chat dialect as messages with ``tool_calls`` and ``tool`` results.
One server answers both, turns interleaved; each dialect's conversation has a
system prompt of its own (a session line), so neither warms the other.

Targets: from turn 2 on, at least 95% of each turn's input read from the
prompt cache (Anthropic's ``cache_read_input_tokens`` over the sum of the three
input fields); median time to first token through /v1/messages at most 1.05x
that through /v1/chat/completions.  Also printed: the share of what a cache
could hold that was read (everything but the tokens new since the previous
turn's prompt and reply), which says whether any reuse was missed.  Exits 1 if
a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from bench_cache import TOOLS, billing_line, system_prompt

from serverlib import free_port, start_and_wait, stream_chat, stream_messages

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "scripts" / "mlx-server.py"
TASK = "The test suite fails in tests/test_parser.py; find out why and fix it."
PROJECT_GUIDE = "\n".join(
    f"- {rule}"
    for rule in [
        "Use Python 3.11; type hints everywhere; mypy --strict must pass.",
        "Run `pytest -q` before every commit; a red test blocks the commit.",
        "Format with `ruff format` and lint with `ruff check`; never silence a rule without a comment.",
        "Modules stay under 400 lines; one responsibility each; names explain themselves.",
        "Public functions have a docstring that says why and what they never do.",
        "Errors inside are precise exceptions; translate them once, at the boundary.",
        "No network access in tests; fixtures build their own data in temporary directories.",
        "Log with the standard logging module; never print secrets, tokens or keys.",
        "Commit in small steps with messages that say what changed and why.",
        "Benchmarks live in bench/ and report ratios against a baseline from the same run.",
    ]
    * 3
)
CONTEXT = (
    "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
    "# currentDate\nToday's date is 2026-11-25.\n\n# claudeMd\nContents of /home/dev/project/CLAUDE.md "
    f"(project instructions, checked into the codebase):\n\n{PROJECT_GUIDE}\n\n"
    "      IMPORTANT: this context may or may not be relevant to your tasks.\n</system-reminder>\n"
)
CACHE_TARGET = 0.95
TTFT_TARGET = 1.05


def tool_step(step: int) -> tuple[str, dict[str, Any], str]:
    """The assistant's call at ``step`` and the tool's result (a file listing)."""
    path = f"src/module_{step}.py"
    body = "\n".join(
        f"{line:4d}  def handler_{step}_{line}(request): return process(request, {line})" for line in range(1, 6)
    )
    return f"toolu_{step:024x}", {"path": path}, f"{path}:\n{body}"


def anthropic_request(session: str, replies: list[str], max_tokens: int) -> dict[str, Any]:
    """Turn ``len(replies) + 1``: system blocks with a fresh billing line, and cache_control on the newest block."""
    system = [
        {"type": "text", "text": billing_line()},
        {"type": "text", "text": f"Session {session}.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": system_prompt(), "cache_control": {"type": "ephemeral"}},
    ]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": CONTEXT}, {"type": "text", "text": TASK}]}
    ]
    for step, reply in enumerate(replies, 1):
        call_id, arguments, result = tool_step(step)
        call = {"type": "tool_use", "id": call_id, "name": "read_file", "input": arguments}
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}, call]})
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": result}]}
        )
    messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}  # the marker moves every turn
    tools = [
        {"name": tool["name"], "description": tool["description"], "input_schema": tool["parameters"]} for tool in TOOLS
    ]
    return {"model": "claude-opus-4-8", "max_tokens": max_tokens, "temperature": 0, "system": system,
            "messages": messages, "tools": tools}  # fmt: skip


def chat_request(session: str, replies: list[str], max_tokens: int) -> dict[str, Any]:
    """The same turn in OpenAI's chat dialect."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"{billing_line()}\nSession {session}.\n{system_prompt()}"},
        {"role": "user", "content": CONTEXT + TASK},
    ]
    for step, reply in enumerate(replies, 1):
        call_id, arguments, result = tool_step(step)
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps(arguments)},
        }
        messages.append({"role": "assistant", "content": reply, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
    tools = [{"type": "function", "function": tool} for tool in TOOLS]
    return {"model": "m", "max_tokens": max_tokens, "temperature": 0, "messages": messages, "tools": tools}


@dataclass
class Turn:
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int = 0

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens

    def reusable_share(self, previous: Turn) -> float:
        """Read / what an earlier request could have left in the cache (its prompt and its reply)."""
        return self.cached_tokens / min(self.prompt_tokens, previous.prompt_tokens + previous.generated_tokens)


def ask_anthropic(client: httpx.Client, body: dict[str, Any]) -> tuple[Turn, str]:
    reply = stream_messages(client, body)
    usage = reply.usage
    total = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    turn = Turn(reply.time_to_first_token_ms, total, usage["cache_read_input_tokens"], usage["output_tokens"])
    return turn, reply.text


def ask_chat(client: httpx.Client, body: dict[str, Any]) -> tuple[Turn, str]:
    reply = stream_chat(client, body)
    cached = int((reply.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    usage = reply.usage
    turn = Turn(reply.time_to_first_token_ms, int(usage["prompt_tokens"]), cached, int(usage["completion_tokens"]))
    return turn, reply.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=8, help="turns in the conversation (default 8)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn (default 8)")
    arguments = parser.parse_args()
    port = free_port()
    command = [sys.executable, str(SERVER), "--port", str(port), "--response-cache-size", "0"]
    process = start_and_wait(command, f"http://127.0.0.1:{port}/health", {**os.environ, "ANYCLAUDE_DEBUG": "0"})
    messages_turns: list[Turn] = []
    chat_turns: list[Turn] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1800) as client:
            sessions = {"messages": secrets.token_hex(4), "chat": secrets.token_hex(4)}
            replies: dict[str, list[str]] = {"messages": [], "chat": []}
            for turn in range(1, arguments.turns + 1):
                for dialect in ("messages", "chat"):  # interleaved, so machine noise hits both alike
                    session, history = sessions[dialect], replies[dialect]
                    if dialect == "messages":
                        measured, text = ask_anthropic(
                            client, anthropic_request(session, history, arguments.max_tokens)
                        )
                        messages_turns.append(measured)
                    else:
                        measured, text = ask_chat(client, chat_request(session, history, arguments.max_tokens))
                        chat_turns.append(measured)
                    history.append(text or "Let me look.")
                    print(
                        f"  turn {turn} {dialect:>8}: {measured.prompt_tokens} prompt tokens, {measured.cached_tokens} "
                        f"cached ({measured.cached_share:.1%}), TTFT {measured.ttft_ms:.0f} ms",
                        flush=True,
                    )
    finally:
        process.terminate()
        process.wait(timeout=120)
    sys.exit(0 if report(messages_turns, chat_turns) else 1)


def report(messages_turns: list[Turn], chat_turns: list[Turn]) -> bool:
    print("\n| turn | prompt tokens | /v1/messages TTFT (ms) | read from cache | of what could be | ", end="")
    print("/v1/chat/completions TTFT (ms) | read from cache |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for turn, (anthropic, openai) in enumerate(zip(messages_turns, chat_turns), 1):
        reusable = f"{anthropic.reusable_share(messages_turns[turn - 2]):.1%}" if turn > 1 else "-"
        print(
            f"| {turn} | {anthropic.prompt_tokens:,} | {anthropic.ttft_ms:,.0f} | {anthropic.cached_share:.1%} | "
            f"{reusable} | {openai.ttft_ms:,.0f} | {openai.cached_share:.1%} |"
        )
    warm = messages_turns[1:]
    lowest_share = min(turn.cached_share for turn in warm)
    ratio = statistics.median(turn.ttft_ms for turn in warm) / statistics.median(
        turn.ttft_ms for turn in chat_turns[1:]
    )
    print("\n| target | measured | bound | |\n|---|---:|---:|---|")
    share_met, ratio_met = lowest_share >= CACHE_TARGET, ratio <= TTFT_TARGET
    rows = [
        ("lowest share of input read from the cache, turns 2+", lowest_share, f">= {CACHE_TARGET}", share_met),
        ("median TTFT, /v1/messages / /v1/chat/completions, turns 2+", ratio, f"<= {TTFT_TARGET}", ratio_met),
    ]
    for label, value, bound, met in rows:
        print(f"| {label} | {value:.3f} | {bound} | {'met' if met else 'MISSED'} |")
    return share_met and ratio_met


if __name__ == "__main__":
    main()
