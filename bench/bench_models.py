#!/usr/bin/env python3
"""Several models in one server: side requests on a small model, load and unload times, embeddings throughput.

    make bench-models        (or: .venv/bin/python bench/bench_models.py [--turns N])

Side requests.  A Claude Code-shaped session on /v1/messages: at every user
prompt the CLI sends the main turn (a ~2k-token system prompt with tools and
a growing conversation, its main model) and, at the same moment, a session
title request (a ~800-token prompt of its own, its small model's id: with
``ANTHROPIC_DEFAULT_HAIKU_MODEL=small`` that is ``small``, else a
``claude-haiku-*`` name).  Two servers run at once, turns alternating between
them: one serves the default model alone (the title request shares its
batch), the other also a small model for the side requests (a tiny
random-weight Qwen3, ``--alias 'claude-haiku-*=small'``).  Main-turn time to
first token and total time, and the side request's latency.

Load and unload: each model of the second server unloaded and loaded again
(POST /models/unload, /models/load), three times.

Embeddings: a decoder embedding model (mlx-lm's qwen3 class, hidden size 384,
6 layers, random weights) served by a third server, against the same model's
pooled forward pass (the last token's final state, normalized) called directly
in this process; ~40-token inputs in batches of 1, 8 and 64, base64 over HTTP.

Targets: main-turn time to first token with the small model at most 0.7x the
single-model run; embeddings throughput at least 0.9x the direct forward pass
at every batch size.  Exits 1 if one is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from serverlib import StreamedReply, our_server, report_targets, stream_messages

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from mlx_server.blas import preload_optimized_blas  # noqa: E402

preload_optimized_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_server.model.default_model import find_default_model  # noqa: E402
from testbed.tiny_models import FAMILIES, SMALL, Family, build  # noqa: E402

SIDE_TARGET, EMBEDDING_TARGET = 0.7, 0.9
TOOLS = [{"name": f"tool_{index}", "description": f"Tool {index} of the agent: reads, writes or runs things. " * 3,
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
         for index in range(8)]  # fmt: skip
EMBEDDER = Family("qwen3", "qwen3", {**FAMILIES["qwen3"].config, **SMALL, "hidden_size": 384, "num_hidden_layers": 6,
                  "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64},
                  "KVCache")  # fmt: skip


def words(topic: str, count: int) -> str:
    sentence = f"The {topic} notes say that every module has one job and its tests read as specifications. "
    return sentence * max(1, count // 18)


def side_turns(url: str, turns: int, session: str) -> tuple[list[StreamedReply], list[float]]:
    """The session's main turns and, sent with each, a title request; returns the main replies and side latencies."""
    system = words("agent instructions", 2000)
    messages: list[dict[str, Any]] = []
    mains: list[StreamedReply] = []
    sides: list[float] = []
    headers = {"x-claude-code-session-id": session}
    with httpx.Client(base_url=url, timeout=1800) as main_client, httpx.Client(base_url=url, timeout=1800) as side:
        for turn in range(turns):
            prompt = f"Step {turn}: " + words(f"step {turn}", 120)
            messages.append({"role": "user", "content": prompt})
            title = {
                "model": "claude-haiku-4-5",
                "max_tokens": 24,
                "temperature": 0,
                "system": words("title instructions", 800),
                "messages": [{"role": "user", "content": f"<session>\n{prompt}\n</session>\nWrite the title."}],
            }
            body = {"model": "claude-sonnet-4-5", "max_tokens": 24, "temperature": 0, "system": system,
                    "tools": TOOLS, "messages": messages}  # fmt: skip
            titled: list[StreamedReply] = []
            thread = threading.Thread(target=_send, args=(side, title, headers, titled))
            thread.start()
            reply = stream_messages(main_client, body, headers)
            thread.join()
            mains.append(reply)
            sides.append(((titled[0].finished or titled[0].started) - titled[0].started) * 1000)
            messages.append({"role": "assistant", "content": reply.text or "OK."})
    return mains, sides


def _send(client: httpx.Client, body: dict[str, Any], headers: dict[str, str], into: list[StreamedReply]) -> None:
    into.append(stream_messages(client, body, headers))


def side_requests(turns: int, small: Path) -> tuple[float, str]:
    """Both servers, turns alternating; prints the table; returns the TTFT ratio and a line for the table."""
    default = str(find_default_model())
    common = ["--response-cache-size", "0", "--default-temperature", "0"]
    with (
        our_server(ROOT, ["--model", f"main={default}", *common]) as alone,
        our_server(
            ROOT,
            ["--model", f"main={default}", "--model", f"small={small}", "--alias", "claude-haiku-*=small", *common],
        ) as with_small,
    ):
        results: dict[str, tuple[list[StreamedReply], list[float]]] = {"alone": ([], []), "small": ([], [])}
        for turn in range(turns):  # one turn each, alternating: machine noise hits both alike
            for label, url in (("alone", alone), ("small", with_small)):
                mains, sides = side_turns(url, 1, f"bench-{label}-{turn}")
                results[label][0].extend(mains)
                results[label][1].extend(sides)
    print("\n| side requests on | main TTFT median (ms) | main total median (ms) | side latency median (ms) |")
    print("| --- | ---: | ---: | ---: |")
    medians = {}
    for label, (mains, sides) in results.items():
        ttft = statistics.median(reply.time_to_first_token_ms for reply in mains)
        total = statistics.median(((reply.finished or reply.started) - reply.started) * 1000 for reply in mains)
        medians[label] = ttft
        print(f"| {'the main model' if label == 'alone' else 'a small model'} | {ttft:,.0f} | {total:,.0f} | "
              f"{statistics.median(sides):,.0f} |")  # fmt: skip
    ratio = medians["small"] / medians["alone"]
    return ratio, f"main-turn TTFT with a small model / alone: {ratio:.2f}x (target <= {SIDE_TARGET})"


def load_times(small: Path, embedder: Path) -> None:
    default = str(find_default_model())
    arguments = ["--model", f"main={default}", "--model", f"small={small}", "--embedding-model", f"embed={embedder}"]
    with our_server(ROOT, arguments) as url, httpx.Client(base_url=url, timeout=600) as client:
        print("\n| model | load (s), median of 3 | unload (s), median of 3 |\n| --- | ---: | ---: |")
        for name in ("main", "small", "embed"):
            loads, unloads = [], []
            for _ in range(3):
                started = time.perf_counter()
                client.post("/models/load", json={"model": name}).raise_for_status()
                loads.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.post("/models/unload", json={"model": name}).raise_for_status()
                unloads.append(time.perf_counter() - started)
            print(f"| {name} | {statistics.median(loads):.2f} | {statistics.median(unloads):.2f} |")


def direct_embeddings(directory: Path, batches: list[list[list[int]]]) -> float:
    """Inputs per second of the model's own pooled forward pass, in this process."""
    from mlx_lm import load

    model = load(str(directory))[0]
    started = time.perf_counter()
    count = 0
    for batch in batches:
        lengths = [len(row) for row in batch]
        padded = mx.array([row + [0] * (max(lengths) - len(row)) for row in batch])
        states = model.model(padded)[mx.arange(len(batch)), mx.array(lengths) - 1]
        mx.eval(states / mx.linalg.norm(states, axis=-1, keepdims=True))
        count += len(batch)
    return count / (time.perf_counter() - started)


def served_embeddings(client: httpx.Client, batches: list[list[list[int]]]) -> float:
    started = time.perf_counter()
    count = 0
    for batch in batches:
        body = {"model": "embed", "input": batch, "encoding_format": "base64"}
        client.post("/v1/embeddings", json=body).raise_for_status()
        count += len(batch)
    return count / (time.perf_counter() - started)


def embeddings(directory: Path) -> list[str]:
    rng = np.random.default_rng(0)
    missed = []
    print("\n| batch | direct (inputs/s) | server (inputs/s) | server (tokens/s) | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with (
        our_server(ROOT, ["--embedding-model", f"embed={directory}"]) as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        for size in (1, 8, 64):
            batches = [[rng.integers(100, 20000, size=int(rng.integers(32, 48))).tolist() for _ in range(size)]
                       for _ in range(max(2, 128 // size))]  # fmt: skip
            served_embeddings(client, batches[:1])  # warm
            direct, served = [], []
            for _ in range(3):  # alternating
                direct.append(direct_embeddings(directory, batches))
                served.append(served_embeddings(client, batches))
            tokens = sum(len(row) for batch in batches for row in batch) / sum(len(batch) for batch in batches)
            ratio = statistics.median(served) / statistics.median(direct)
            print(f"| {size} | {statistics.median(direct):.1f} | {statistics.median(served):.1f} | "
                  f"{statistics.median(served) * tokens:,.0f} | {ratio:.2f}x |")  # fmt: skip
            if ratio < EMBEDDING_TARGET:
                missed.append(f"embeddings at batch {size}: {ratio:.2f}x the direct forward pass < {EMBEDDING_TARGET}")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=5, help="main turns per server (default 5)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        small = build(FAMILIES["qwen3"], Path(scratch) / "small", dtype="float32")
        embedder = build(EMBEDDER, Path(scratch) / "embedder", dtype="float32")
        ratio, line = side_requests(arguments.turns, small)
        load_times(small, embedder)
        missed = embeddings(embedder)
    print(f"\n{line}")
    if ratio > SIDE_TARGET:
        missed.insert(0, line)
    return report_targets(missed)


if __name__ == "__main__":
    sys.exit(main())
