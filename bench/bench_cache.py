#!/usr/bin/env python3
"""The prompt cache on a coding agent's workload, against no cache and against mlx_lm.server, in one run.

    make bench-cache        (or: .venv/bin/python bench/bench_cache.py)

Workload, as Claude Code sends it through anyclaude: a system prompt of more
than 2,000 tokens (instructions and tool definitions) whose first line is the
``x-anthropic-billing-header`` that changes on every request; three
conversations interleaved; eight turns each, every turn ending in a tool
result.  The same requests go, one server at a time, to:

1. this server with its prompt cache,
2. this server with the cache off (--prompt-cache-size 0),
3. mlx_lm.server on the same weights (exported with --export-mlx), with the
   same BLAS and prefill step.

It prints per-turn time to first token and prefill tokens computed, then the
targets: a warm turn's TTFT at most 1/20 of a cold one; prefill tokens at most
1/10 of the no-cache run; median TTFT at most 0.5x mlx_lm.server's; the cache's
resident bytes never above its bound.  Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serverlib import free_port, mlx_lm_server, start_and_wait, stream_chat

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "scripts" / "mlx-server.py"
CACHE_BOUND = "1G"
PREFILL_STEP = "256"  # what this server uses on CPU; mlx_lm.server is given the same

TOOLS = [
    {
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": {
                argument: {"type": "string", "description": f"The {argument} to use."} for argument in arguments
            },
            "required": list(arguments),
        },
    }
    for name, description, arguments in [
        ("read_file", "Read a file from the repository and return its text with line numbers.", ("path",)),
        (
            "write_file",
            "Replace the whole content of a file; create it and its folders if needed.",
            ("path", "content"),
        ),
        ("edit_file", "Replace one exact occurrence of old text with new text in a file.", ("path", "old", "new")),
        ("run", "Run a shell command in the repository root and return its exit code and output.", ("command",)),
        ("search", "Search the repository for a regular expression and list matching lines.", ("pattern", "glob")),
        ("list_dir", "List a directory's entries with their sizes and kinds.", ("path",)),
    ]
]
RULES = [
    "Read a file before you change it, and change only what the task needs.",
    "Run the test suite after every change and report failures exactly as printed.",
    "Prefer small, reviewable steps; explain each step in one sentence before taking it.",
    "Never print secrets, tokens or credentials, even when a file contains them.",
    "When a command fails, read its output, form one hypothesis, and test it.",
    "Keep the style of the surrounding code: naming, formatting, error handling.",
    "Ask before deleting files or rewriting history; never force-push.",
    "When you are unsure about an API, search the repository for existing uses first.",
]
TASKS = [
    "Fix the failing test in tests/test_parser.py.",
    "Add a --verbose flag to the command-line interface.",
    "Find why the cache grows without bound and fix it.",
]


def system_prompt() -> str:
    """An agent system prompt: rules repeated per section, then the tool definitions (> 2,000 tokens)."""
    sections = []
    topics = ["Editing", "Testing", "Debugging", "Reviewing", "Communicating", "Safety", "Planning", "Refactoring"]
    for number, topic in enumerate(topics, 1):
        sections.append(f"## {number}. {topic}\n" + "\n".join(f"- ({topic.lower()}) {rule}" for rule in RULES))
    tools = "\n".join(json.dumps(tool) for tool in TOOLS)
    return (
        "You are an expert software engineering agent working in the user's repository.\n\n"
        + "\n\n".join(sections)
        + f"\n\n# Tools\nCall a tool by answering with its name and JSON arguments.\n{tools}\n"
        + "\n# Environment\nThe repository is a Python 3.11 project using pytest, ruff and mypy; the default branch is "
        "main and the working tree is clean when a task starts. Keep answers short unless asked for detail.\n"
    )


def billing_line() -> str:
    return f"x-anthropic-billing-header: cc_version=2.1.36.8f3; cc_entrypoint=cli; cch={secrets.token_hex(6)};"


def conversation_turn(task: str, turn: int) -> list[dict[str, Any]]:
    """The messages of one request: turn ``turn`` (1-based) of ``task``, ending with a tool result."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": billing_line() + "\n" + system_prompt()},
        {"role": "user", "content": task},
    ]
    for step in range(1, turn + 1):
        path = f"src/module_{step}.py"
        messages.append({"role": "assistant", "content": f'read_file {{"path": "{path}"}}'})
        body = "\n".join(
            f"{line:4d}  def handler_{step}_{line}(request): return process(request, {line})" for line in range(1, 6)
        )
        messages.append({"role": "tool", "content": f"{path}:\n{body}", "tool_call_id": f"call_{step}"})
    return messages


@dataclass
class Measurement:
    conversation: int
    turn: int
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class Run:
    name: str
    measurements: list[Measurement] = field(default_factory=list)
    max_cache_bytes: int = 0
    cache_bound: int = 0


def _ask(client: httpx.Client, messages: list[dict[str, Any]], max_tokens: int) -> tuple[float, int, int]:
    """Stream one request; returns (TTFT ms, prompt tokens, cached tokens)."""
    # mlx_lm.server loads any other model name as a model; this server merely echoes it.
    body = {"model": "default_model", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply = stream_chat(client, body)
    cached = int((reply.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return reply.time_to_first_token_ms, int(reply.usage["prompt_tokens"]), cached


def drive(
    run: Run, base_url: str, turns: int, max_tokens: int, cache_report: Callable[[httpx.Client], dict[str, Any]] | None
) -> None:
    with httpx.Client(base_url=base_url, timeout=1800) as client:
        for turn in range(1, turns + 1):
            for number, task in enumerate(TASKS):
                ttft, prompt_tokens, cached = _ask(client, conversation_turn(task, turn), max_tokens)
                run.measurements.append(Measurement(number, turn, ttft, prompt_tokens, cached))
                if cache_report is not None:
                    report = cache_report(client)
                    run.max_cache_bytes = max(run.max_cache_bytes, int(report["bytes"]))
                    run.cache_bound = int(report["max_bytes"])
                print(
                    f"  {run.name}: conversation {number + 1} turn {turn}: {prompt_tokens} prompt tokens, "
                    f"{prompt_tokens - cached} computed, TTFT {ttft:.0f} ms",
                    flush=True,
                )


def run_our_server(name: str, extra: list[str], turns: int, max_tokens: int) -> Run:
    port = free_port()
    command = [sys.executable, str(SERVER), "--port", str(port), "--response-cache-size", "0", *extra]
    process = start_and_wait(command, f"http://127.0.0.1:{port}/health", {**os.environ, "ANYCLAUDE_DEBUG": "0"})
    run = Run(name)
    try:
        drive(
            run,
            f"http://127.0.0.1:{port}",
            turns,
            max_tokens,
            lambda client: client.get("/v1/cache").json()["prompt_cache"],
        )
    finally:
        process.terminate()
        process.wait(timeout=120)
    return run


def run_mlx_lm_server(turns: int, max_tokens: int) -> Run:
    """mlx_lm.server on the same weights, with the same BLAS preloaded and the same prefill step."""
    run = Run("mlx_lm.server")
    with mlx_lm_server(ROOT, ["--prefill-step-size", PREFILL_STEP]) as url:
        drive(run, url, turns, max_tokens, None)
    return run


def report(runs: list[Run], turns: int) -> bool:
    cached, uncached = runs[0], runs[1]
    reference = runs[2] if len(runs) > 2 else None
    names = [run.name for run in runs]
    print("\nPer turn: median time to first token (ms) over the conversations, and prefill tokens computed (sum)")
    header = " | ".join(f"{name} TTFT" for name in names) + " | " + " | ".join(f"{name} prefill" for name in names)
    print(f"| turn | {header} |")
    print("|---:|" + "---:|" * (2 * len(runs)))
    for turn in range(1, turns + 1):
        ttfts = [statistics.median(m.ttft_ms for m in run.measurements if m.turn == turn) for run in runs]
        prefills = [sum(m.prefill_tokens for m in run.measurements if m.turn == turn) for run in runs]
        print(
            f"| {turn} | "
            + " | ".join(f"{value:.0f}" for value in ttfts)
            + " | "
            + " | ".join(str(p) for p in prefills)
            + " |"
        )

    system_tokens = min(m.prompt_tokens for m in uncached.measurements)
    cold = statistics.median(m.ttft_ms for m in uncached.measurements)
    warm = statistics.median(m.ttft_ms for m in cached.measurements if m.turn > 1)
    prefill_ratio = sum(m.prefill_tokens for m in cached.measurements) / sum(
        m.prefill_tokens for m in uncached.measurements
    )
    checks = [
        ("warm-turn TTFT / cold TTFT (no-cache median)", warm / cold, 1 / 20, "<="),
        ("prefill tokens, cache / no cache", prefill_ratio, 1 / 10, "<="),
    ]
    if reference is not None:
        ratio = statistics.median(m.ttft_ms for m in cached.measurements) / statistics.median(
            m.ttft_ms for m in reference.measurements
        )
        checks.append(("median TTFT, cache / mlx_lm.server", ratio, 0.5, "<="))
    checks.append(("max resident cache bytes / bound", cached.max_cache_bytes / cached.cache_bound, 1.0, "<="))
    print(f"\nSmallest prompt: {system_tokens} tokens. Median TTFT: cold (no cache) {cold:.0f} ms, warm {warm:.0f} ms.")
    used, bound = cached.max_cache_bytes / 2**20, cached.cache_bound / 2**20
    print(f"Cache resident bytes: at most {used:.1f} MiB of a {bound:.0f} MiB bound.\n")
    print(f"| {'target':48} | {'measured':>9} | {'bound':>8} |")
    print(f"|{'-' * 50}|{'-' * 10}:|{'-' * 9}:|")
    all_met = system_tokens >= 2000
    for label, value, bound, _ in checks:
        met = value <= bound
        all_met &= met
        print(f"| {label:48} | {value:9.3f} | {bound:8.3f} | {'ok' if met else 'MISSED'}")
    return all_met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation (default 8)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn (default 8)")
    parser.add_argument("--skip-mlx-lm", action="store_true", help="do not run mlx_lm.server (the slowest part)")
    arguments = parser.parse_args()
    print(f"{len(TASKS)} conversations x {arguments.turns} turns; each server runs alone.", flush=True)
    runs = [
        run_our_server("cache", ["--prompt-cache-bytes", CACHE_BOUND], arguments.turns, arguments.max_tokens),
        run_our_server("no cache", ["--prompt-cache-size", "0"], arguments.turns, arguments.max_tokens),
    ]
    if not arguments.skip_mlx_lm:
        try:
            runs.append(run_mlx_lm_server(arguments.turns, arguments.max_tokens))
        except (httpx.HTTPError, subprocess.CalledProcessError, SystemExit) as error:
            print(f"mlx_lm.server run failed ({error}); reporting the other runs", file=sys.stderr)
    sys.exit(0 if report(runs, arguments.turns) else 1)


if __name__ == "__main__":
    main()
