#!/usr/bin/env python3
"""One model over two processes on this machine (mlx.launch, ring backend on 127.0.0.1) against one process.

    make bench-distributed   (or: .venv/bin/python bench/bench_distributed.py [--tokens N])

The model: mlx-lm's Qwen3 MoE class (it splits both ways) with random weights
in float32, hidden size 1024, 16 layers (16 attention heads, 8 KV heads, 4
experts of 1024, 2 per token), Qwen3's tokenizer (its 151,669-token embedding
is tied to the output layer).  Measured:

* weight memory per rank, from this server's own sharded loader on each rank
  (``model.sharded.load_shard``), against one process's, split tensor-parallel
  and pipeline-parallel; also the layers' share alone;
* decode tokens/s through the server (chat completions, greedy, distinct
  prompts, no answer cache) at 1 and 8 concurrent clients, one process against
  two ranks tensor-parallel, under mlx.launch and started with its environment
  alone (``testbed.ranks.start_ranks_directly``): the launcher's relay loop
  keeps a core busy, half of this machine.

Read the figures as what they are: the two ranks share this machine's cores and
memory bus, so they are no faster than one process here (every layer adds two
collectives over the loopback ring); the point on one machine is correctness and
memory, and across Macs over Thunderbolt, models that do not fit one.

Target: weight memory per rank at most 0.55x one process's.  mlx-lm's
``shard`` and ``pipeline`` keep the embedding and output layer whole on the
ranks that use them, so the whole-model ratio lands at (embedding share) +
(layers share)/2; the layers' ratio is shown beside it.  Exits 1 if missed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from serverlib import free_port, our_server, report_targets, start_and_wait, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from testbed.ranks import launch_command, start_ranks_directly, stop_ranks  # noqa: E402
from testbed.tiny_models import FAMILIES, Family, build  # noqa: E402

MEMORY_TARGET = 0.55
MODEL = Family("qwen3_moe", "qwen3", {**FAMILIES["qwen3_moe"].config, "hidden_size": 1024, "num_hidden_layers": 16,
               "intermediate_size": 4096, "moe_intermediate_size": 1024, "num_experts": 4, "num_experts_per_tok": 2,
               "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64},
               "KVCache (MoE)")  # fmt: skip
PROBE = """
import json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
sys.path.insert(0, sys.argv[3])
from mlx_server.model.sharded import load_shard
group = mx.distributed.init()
loaded = load_shard(sys.argv[1], group, sys.argv[2])
arrays = dict(tree_flatten(loaded.model.parameters()))
layers = sum(value.nbytes for name, value in arrays.items() if ".layers." in name)
print("SHARD", json.dumps({"rank": group.rank(), "total": sum(v.nbytes for v in arrays.values()), "layers": layers}))
mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
"""


def weights(model: Path, scratch: Path) -> dict[str, tuple[int, int]]:
    """(whole model, layers) bytes: one process, and the largest rank of each split."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    whole = load(str(model))[0]
    arrays = dict(tree_flatten(whole.parameters()))
    found = {"one process": (sum(v.nbytes for v in arrays.values()),
                             sum(v.nbytes for name, v in arrays.items() if ".layers." in name))}  # fmt: skip
    probe = scratch / "probe.py"
    probe.write_text(PROBE)
    for split in ("tensor", "pipeline"):
        print(f"measuring the weights of each rank, {split} parallel ...", file=sys.stderr, flush=True)
        completed = subprocess.run(launch_command(str(probe), str(model), split, str(ROOT / "scripts")),
                                   capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        output = completed.stdout
        ranks = [json.loads(line.split("SHARD", 1)[1]) for line in output.splitlines() if "SHARD" in line]
        if len(ranks) != 2:
            raise SystemExit(f"the {split} probe failed:\n{output[-3000:]}\n{completed.stderr[-3000:]}")
        largest = max(ranks, key=lambda rank: rank["total"])
        found[f"{split} parallel, 2 ranks"] = (largest["total"], largest["layers"])
    return found


@contextmanager
def two_ranks(model: Path, launcher: bool) -> Iterator[str]:
    """Two ranks tensor-parallel: under mlx.launch, as users run them, or started with its environment alone."""
    port = free_port()
    arguments = [str(ROOT / "scripts" / "mlx-server.py"), "--model", str(model), "--port", str(port),
                 "--response-cache-size", "0", "--default-temperature", "0"]  # fmt: skip
    environment = {**os.environ, "ANYCLAUDE_DEBUG": "0"}
    if launcher:
        process = start_and_wait(launch_command(*arguments), f"http://127.0.0.1:{port}/health", environment)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_ranks(process, port)
        return
    ranks = start_ranks_directly(arguments, [free_port(), free_port()], environment)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/health", ranks[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        ranks[0].send_signal(signal.SIGINT)  # rank 0 tells the other rank
        for rank in ranks:
            try:
                rank.wait(timeout=60)
            except subprocess.TimeoutExpired:
                rank.kill()


def decode_rate(url: str, clients: int, tokens: int, round_index: int) -> float:
    """Generated tokens per second over ``clients`` concurrent greedy requests of ``tokens`` tokens."""

    def one(index: int) -> int:
        body = {
            "model": "m",
            "max_tokens": tokens,
            "messages": [
                {"role": "user", "content": f"Round {round_index}, client {index}: list the steps of a release."}
            ],
        }
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {response.text}")
        return int(response.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(one, range(clients)))
    return generated / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=24)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model = build(MODEL, scratch / "qwen3-moe-bench", dtype="float32")
        memory = weights(model, scratch)
        rates: dict[str, dict[int, float]] = {}
        servers = {
            "one process": our_server(ROOT, ["--model", str(model), "--response-cache-size", "0",
                                             "--default-temperature", "0"]),
            "two ranks, tensor parallel, mlx.launch": two_ranks(model, launcher=True),
            "two ranks, tensor parallel, no launcher": two_ranks(model, launcher=False),
        }  # fmt: skip
        for label, serving in servers.items():
            print(f"decoding: {label} ...", file=sys.stderr, flush=True)
            with serving as url:
                decode_rate(url, 1, 4, -1)  # warm
                rates[label] = {clients: statistics.median(decode_rate(url, clients, arguments.tokens, index)
                                                            for index in range(2)) for clients in (1, 8)}  # fmt: skip
    base_total, base_layers = memory["one process"]
    print("\nweights per rank (the largest rank), against one process")
    print("| | weights (MB) | ratio | layers (MB) | layers ratio |\n| --- | ---: | ---: | ---: | ---: |")
    missed = []
    for label, (total, layers) in memory.items():
        ratio = total / base_total
        print(f"| {label} | {total / 1e6:,.0f} | {ratio:.2f}x | {layers / 1e6:,.0f} | {layers / base_layers:.2f}x |")
        if label != "one process" and ratio > MEMORY_TARGET:
            missed.append(f"{label}: {ratio:.2f}x of one process's weights (target <= {MEMORY_TARGET})")
    print("\ndecode tokens/s through the server (greedy, median of 2 rounds)")
    print("| | 1 client | 8 clients |\n| --- | ---: | ---: |")
    for label, by_clients in rates.items():
        print(f"| {label} | {by_clients[1]:.1f} | {by_clients[8]:.1f} |")
    return report_targets(missed)


if __name__ == "__main__":
    sys.exit(main())
