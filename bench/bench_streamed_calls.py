#!/usr/bin/env python3
"""When a long Write call's arguments start to arrive: as they are written, against at the call's end.

    make bench-streamed-calls   (or: .venv/bin/python bench/bench_streamed_calls.py [--trials N])

The server with the bundled model is forced (``tool_choice`` a named tool)
to call ``Write`` with a file of 500 to 600 characters, over Anthropic's
streaming Messages API, as Claude Code asks for it.  Each trial times, from
the request: the first byte of the call's arguments (an ``input_json_delta``)
and the call's end (its ``content_block_stop``).  Before arguments were
streamed, the call's whole input was sent at its end, so the call's end is
the baseline, measured in the same request.  Also reported: how many
argument pieces arrive, and the reply's output tokens per piece (the forced
reply is the call: its markup and its arguments).
Targets: first argument byte / call end <= 0.25; at most 4 output tokens per piece.  Exits 1 if missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

from serverlib import our_server, report_targets  # noqa: E402

FIRST_BYTE_TARGET = 0.25
TOKENS_PER_PIECE_TARGET = 4.0
WRITE = {
    "name": "Write",
    "description": "Write a file to the local filesystem.",
    "input_schema": {
        "type": "object",
        "properties": {
            "file_path": {"enum": ["/work/notes.md"]},
            "content": {"type": "string", "minLength": 500, "maxLength": 600},
        },
        "required": ["file_path", "content"],
        "additionalProperties": False,
    },
}


@dataclass
class CallTiming:
    """One streamed forced call: seconds from the request to its name, first argument byte and end."""

    name: float
    first_argument_byte: float
    end: float
    pieces: int
    output_tokens: int  # the call's markup and arguments: all this forced reply generates


def forced_write(client: httpx.Client, seed: int) -> CallTiming:
    body = {
        "model": "default", "max_tokens": 1500, "temperature": 0.7, "seed": seed, "stream": True,
        "messages": [{"role": "user", "content": "Write release notes for version 2 to /work/notes.md."}],
        "tools": [WRITE], "tool_choice": {"type": "tool", "name": "Write"},
    }  # fmt: skip
    started = time.perf_counter()
    name = first = end = 0.0
    arguments: list[str] = []
    output_tokens = 0
    with client.stream("POST", "/v1/messages", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            now = time.perf_counter() - started
            if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
                name = now
            elif event["type"] == "content_block_delta" and event["delta"]["type"] == "input_json_delta":
                if event["delta"]["partial_json"]:
                    first = first or now
                    arguments.append(event["delta"]["partial_json"])
            elif event["type"] == "content_block_stop" and arguments and not end:
                end = now
            elif event["type"] == "message_delta":
                output_tokens = int(event["usage"]["output_tokens"])
    json.loads("".join(arguments))  # the pieces add up to the call's arguments
    return CallTiming(name, first, end, len(arguments), output_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    with (
        our_server(ROOT, ["--prompt-cache-size", "0", "--response-cache-size", "0"]) as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        forced_write(client, seed=0)  # warm-up: the grammar compiled, the kernels loaded
        timings = [forced_write(client, seed) for seed in range(1, args.trials + 1)]

    print(f"{args.trials} forced Write calls (500-600 characters of content), bundled model, Anthropic streaming:\n")
    print("| trial | name (s) | first argument byte (s) | call end (s) | first byte / end | pieces | output tokens |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for number, timing in enumerate(timings, 1):
        share = timing.first_argument_byte / timing.end
        print(f"| {number} | {timing.name:.2f} | {timing.first_argument_byte:.2f} | {timing.end:.2f} | {share:.3f} "
              f"| {timing.pieces} | {timing.output_tokens} |")  # fmt: skip
    ratio = statistics.median(timing.first_argument_byte / timing.end for timing in timings)
    per_piece = statistics.median(timing.output_tokens / timing.pieces for timing in timings)
    print(f"\nmedian first argument byte / call end: {ratio:.3f} (target <= {FIRST_BYTE_TARGET})")
    print(f"median output tokens per piece: {per_piece:.2f} (target <= {TOKENS_PER_PIECE_TARGET})")
    missed = []
    if ratio > FIRST_BYTE_TARGET:
        missed.append(f"first argument byte / call end {ratio:.3f} > {FIRST_BYTE_TARGET}")
    if per_piece > TOKENS_PER_PIECE_TARGET:
        missed.append(f"output tokens per piece {per_piece:.2f} > {TOKENS_PER_PIECE_TARGET}")
    return report_targets(missed)


if __name__ == "__main__":
    raise SystemExit(main())
