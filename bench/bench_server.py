#!/usr/bin/env python3
"""Server overhead: time to first token and decode speed, server vs. mlx-lm in-process, in one run.

    make bench-server        (or: .venv/bin/python bench/bench_server.py [--model PATH])

The baseline is the same model and weights driven in this process through
``mlx_lm.stream_generate``; the server is scripts/mlx-server.py on a free local
port with its prompt and response caches off (the baseline has none), driven by a
streaming HTTP client.  Trials alternate between the two so
that machine noise hits both alike, and medians are compared.  The target:
the server's overhead stays within 10% (TTFT ratio <= 1.10, decode ratio >= 0.90).
Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from mlx_server.blas import preload_optimized_blas  # noqa: E402 - before MLX is imported

BLAS = preload_optimized_blas()

import httpx  # noqa: E402
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlx_server.model.loading import LoadedModel, load_model  # noqa: E402
from serverlib import free_port, start_and_wait, stream_chat  # noqa: E402

PROMPT = (
    "You are reviewing a pull request for a Python web service. The change adds a cache in front of a slow "
    "database query, keyed by the user id and the requested page. Explain, step by step, what could go wrong "
    "with cache invalidation, memory growth, and concurrent requests, and then write a long, detailed story "
    "about an engineer who learns these lessons the hard way over a long night of debugging."
)


@dataclass
class Trial:
    time_to_first_token_ms: float
    decode_tokens_per_second: float
    completion_tokens: int


def _in_process(loaded: LoadedModel, prompt: list[int], max_tokens: int) -> Trial:
    started = time.perf_counter()
    first = last = started
    count = 0
    for response in stream_generate(
        loaded.model, loaded.tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)
    ):
        now = time.perf_counter()
        if count == 0:
            first = now
        last = now
        count = response.generation_tokens
    return Trial((first - started) * 1000, (count - 1) / (last - first), count)


def _server(client: httpx.Client, max_tokens: int) -> Trial:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    reply = stream_chat(client, body)
    assert reply.first_content is not None and reply.last_content is not None
    completion_tokens = int(reply.usage["completion_tokens"])
    decode_seconds = reply.last_content - reply.first_content
    return Trial(reply.time_to_first_token_ms, (completion_tokens - 1) / decode_seconds, completion_tokens)


def _start_server(model: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # Both caches off: the in-process baseline recomputes every prompt, so the server must too.
    command = [sys.executable, str(ROOT / "scripts" / "mlx-server.py"), "--port", str(port)]
    command += ["--prompt-cache-size", "0", "--response-cache-size", "0"]
    if model:
        command += ["--model", model]
    base_url = f"http://127.0.0.1:{port}"
    process = start_and_wait(command, f"{base_url}/health", {**os.environ, "ANYCLAUDE_DEBUG": "0"})
    return process, base_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model reference (default: the bundled SmolLM2-135M GGUF)")
    parser.add_argument("--trials", type=int, default=5, help="alternating trials of each (default 5)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per trial (default 64)")
    arguments = parser.parse_args()

    loaded = load_model(arguments.model)
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    process, base_url = _start_server(arguments.model)
    baseline: list[Trial] = []
    served: list[Trial] = []
    try:
        with httpx.Client(base_url=base_url, timeout=600) as client:
            _in_process(loaded, prompt, 4)  # warm both paths up before measuring
            _server(client, 4)
            for _ in range(arguments.trials):
                baseline.append(_in_process(loaded, prompt, arguments.max_tokens))
                served.append(_server(client, arguments.max_tokens))
    finally:
        process.terminate()
        process.wait(timeout=60)

    def median(trials: list[Trial], field: str) -> float:
        return float(statistics.median(float(getattr(trial, field)) for trial in trials))

    ttft = (median(baseline, "time_to_first_token_ms"), median(served, "time_to_first_token_ms"))
    decode = (median(baseline, "decode_tokens_per_second"), median(served, "decode_tokens_per_second"))
    ttft_ratio, decode_ratio = ttft[1] / ttft[0], decode[1] / decode[0]
    print(
        f"model {loaded.name}, prompt {len(prompt)} tokens, {arguments.max_tokens} generated, "
        f"{arguments.trials} trials each, BLAS {BLAS.name}, python {sys.version.split()[0]}"
    )
    print(f"\n| {'metric (median)':28} | {'mlx-lm in-process':>17} | {'server':>9} | {'ratio':>6} | {'target':>12} |")
    print(f"|{'-' * 30}|{'-' * 18}:|{'-' * 10}:|{'-' * 7}:|{'-' * 13}:|")
    ttft_met, decode_met = ttft_ratio <= 1.10, decode_ratio >= 0.90
    print(
        f"| {'time to first token (ms)':28} | {ttft[0]:17.1f} | {ttft[1]:9.1f} | {ttft_ratio:5.2f}x | "
        f"{'<=1.10x ' + ('ok' if ttft_met else 'MISSED'):>12} |"
    )
    print(
        f"| {'decode (tokens/s)':28} | {decode[0]:17.1f} | {decode[1]:9.1f} | {decode_ratio:5.2f}x | "
        f"{'>=0.90x ' + ('ok' if decode_met else 'MISSED'):>12} |"
    )
    counts = {trial.completion_tokens for trial in baseline + served}
    print(f"\ncompletion tokens per trial: {sorted(counts)}")
    sys.exit(0 if ttft_met and decode_met else 1)


if __name__ == "__main__":
    main()
