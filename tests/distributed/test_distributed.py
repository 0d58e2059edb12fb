"""One model over two processes: ``mlx.launch -n 2 --backend ring`` on 127.0.0.1, rank 0 serving HTTP.

Tiny random-weight models in float32 (mlx-lm's classes, Qwen3's tokenizer):
a Qwen3 split tensor-parallel and a Qwen3 MoE split pipeline-parallel, each
against the same model served by one process.  Greedy output is equal (the
pipeline computes exactly what one process does; the tensor split sums
partial products in another order, so its logits are asserted to agree
too); four concurrent requests batch and equal their lone replies; turn 2
reads its prefix from the prompt cache; a forced call validates; a stream
the client drops ends on both ranks and the service goes on; a killed
follower makes rank 0 say why and stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from testbed.ranks import launch_command, lower_the_relay, rank_pids, stop_ranks
from testbed.tiny_models import FAMILIES, build
from tests.server.conftest import ROOT, RunningServer, free_port, serving_within, start_server, stop_server

pytestmark = pytest.mark.e2e

STARTUP_SECONDS = 180
ARGUMENTS = ["--default-temperature", "0", "--response-cache-size", "0"]
SYSTEM = "You are a release assistant. Answer in one short sentence, and never repeat the question. " * 4
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima", "Oslo"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}  # fmt: skip


def launch(model: Path, parallel: str, log_path: Path, *extra: str) -> RunningServer:
    """Two ranks of scripts/mlx-server.py under mlx.launch; returns once rank 0 answers /health."""
    port = free_port()
    command = launch_command(str(ROOT / "scripts" / "mlx-server.py"), "--model", str(model), "--parallel", parallel,
                             "--port", str(port), *ARGUMENTS, *extra)  # fmt: skip
    log = log_path.open("wb")
    environment = {**os.environ, "ANYCLAUDE_DEBUG": "0", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    lower_the_relay(process, port)
    server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
    if serving_within(server, STARTUP_SECONDS):
        return server
    stop_launch(server)
    raise RuntimeError(f"the ranks did not start in {STARTUP_SECONDS}s:\n{server.log_text()}")


def stop_launch(server: RunningServer) -> None:
    stop_ranks(server.process, port_of(server))


def port_of(server: RunningServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def directories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    return {name: build(FAMILIES[name], root / name, dtype="float32") for name in ("qwen3", "qwen3_moe")}


SPLITS = {"tensor": "qwen3", "pipeline": "qwen3_moe"}


@pytest.fixture(scope="class", params=sorted(SPLITS))
def pair(request: pytest.FixtureRequest, directories: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RunningServer, RunningServer]]:  # fmt: skip
    """(split, the model over two ranks, the same model in one process); stopped once its class's tests ran (an
    idle follower spends most of a core in the ring's receive, waiting for rank 0's next plan)."""
    split = str(request.param)
    model = directories[SPLITS[split]]
    logs = tmp_path_factory.mktemp(split)
    distributed = launch(model, split, logs / "ranks.log")
    single = start_server(logs / "single.log", arguments=["--model", str(model), *ARGUMENTS])
    yield split, distributed, single
    stop_launch(distributed)
    stop_server(single)
    assert "stopped" in distributed.log_text() and "rank 1 of 2" in distributed.log_text()


def chat(server: RunningServer, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    body = {"model": "m", "messages": messages, "max_tokens": 16, **fields}
    response = httpx.post(server.api_url + "/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def relayed_after(server: RunningServer, marker: str, line: str, count: int, seconds: float = 60) -> str:
    """The ranks' log after ``marker`` once it holds ``line`` ``count`` times (or ``seconds`` have passed).

    mlx.launch relays each rank's output in its own time, so rank 1's lines
    may reach the log after rank 0 has answered.
    """
    deadline = time.monotonic() + seconds
    while (after := server.log_text().split(marker)[-1]).count(line) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return after


def asking(question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def text_of(reply: dict[str, Any]) -> str:
    return str(reply["choices"][0]["message"]["content"])


class TestTwoRanksServeAsOne:
    def test_greedy_output_equals_one_process(self, pair: tuple[str, RunningServer, RunningServer]) -> None:
        _, distributed, single = pair
        for question in ("What changed in the last release?", "Which tests failed, and why?"):
            assert text_of(chat(distributed, asking(question))) == text_of(chat(single, asking(question)))

    def test_four_concurrent_requests_batch_and_equal_their_lone_replies(
        self, pair: tuple[str, RunningServer, RunningServer]
    ) -> None:
        _, distributed, single = pair
        questions = [asking(f"Item {index}: " + "describe it. " * (2 + index)) for index in range(4)]
        alone = [text_of(chat(single, messages)) for messages in questions]
        steps = httpx.get(distributed.base_url + "/health", timeout=10).json()["batch"]["decode_steps"]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda messages: chat(distributed, messages), questions))
        assert [text_of(reply) for reply in together] == alone
        generated = sum(reply["usage"]["completion_tokens"] for reply in together)
        after = httpx.get(distributed.base_url + "/health", timeout=10).json()["batch"]["decode_steps"]
        assert after - steps < generated  # steps that decoded several sequences at once

    def test_turn_two_reads_its_prefix_from_the_cache(self, pair: tuple[str, RunningServer, RunningServer]) -> None:
        _, distributed, single = pair
        first = asking("Summarize the release notes.")
        reply = chat(distributed, first)
        second = [*first, {"role": "assistant", "content": text_of(reply)}, {"role": "user", "content": "Shorter?"}]
        turn_two = chat(distributed, second)
        assert turn_two["usage"]["prompt_tokens_details"]["cached_tokens"] >= reply["usage"]["prompt_tokens"] - 1
        assert text_of(turn_two) == text_of(chat(single, second))

    def test_a_forced_call_validates(self, pair: tuple[str, RunningServer, RunningServer]) -> None:
        _, distributed, _ = pair
        reply = chat(distributed, asking("Weather in Lima?"), tools=[WEATHER], tool_choice="required",
                     parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=60)  # fmt: skip
        (call,) = reply["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])

    def test_a_dropped_stream_ends_on_both_ranks_and_the_service_goes_on(
        self, pair: tuple[str, RunningServer, RunningServer]
    ) -> None:
        _, distributed, _ = pair
        body = {"model": "m", "messages": asking("Tell me a long story."), "max_tokens": 400, "stream": True}
        with httpx.stream("POST", distributed.api_url + "/chat/completions", json=body, timeout=120) as response:
            for index, _line in enumerate(response.iter_lines()):
                if index > 6:
                    break  # the client goes away mid-stream
        distributed.wait_idle()
        assert text_of(chat(distributed, asking("Still there?"), max_tokens=4))
        after = relayed_after(distributed, "Tell me", "Generation stopped after", 2)
        assert after.count("Generation stopped after") == 2  # the sequence left the batch on both ranks
        assert "the client disconnected" in after


def test_tensor_parallel_logits_agree_with_one_process(directories: dict[str, Path], tmp_path: Path) -> None:
    """The tensor split sums partial products in another order: its logits agree to float32 rounding."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\nimport mlx.core as mx\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "from mlx_lm.utils import load\nfrom mlx_server.model.sharded import load_shard\n"
        "group = mx.distributed.init()\n"
        "shard = load_shard(sys.argv[1], group, 'tensor')\n"
        "tokens = mx.array([shard.tokenizer.encode('The release notes say the cache was rewritten.')])\n"
        "split = shard.model(tokens)\n"
        "mx.eval(split)  # every rank runs the forward pass's collectives\n"
        "if group.rank() == 0:\n"
        "    whole, _ = load(sys.argv[1])\n"
        "    print('max difference', mx.abs(whole(tokens) - split).max().item(), flush=True)\n"
    )
    completed = subprocess.run(
        launch_command(str(probe), str(directories["qwen3"])), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    difference = float(completed.stdout.split("max difference")[1].split()[0])
    assert difference < 1e-4


def test_a_model_that_cannot_be_split_so_is_refused_with_what_it_supports(
    directories: dict[str, Path], tmp_path: Path
) -> None:
    completed = subprocess.run(
        launch_command(str(ROOT / "scripts" / "mlx-server.py"), "--model", str(directories["qwen3"]),
                       "--parallel", "pipeline", "--port", str(free_port())),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    assert "cannot be split for --parallel pipeline" in output and "supports --parallel tensor" in output
    assert "Traceback" not in output


def test_a_killed_follower_ends_the_service_with_a_message(directories: dict[str, Path], tmp_path: Path) -> None:
    server = launch(directories["qwen3"], "tensor", tmp_path / "ranks.log")
    try:
        os.kill(rank_pids(port_of(server))[1], signal.SIGKILL)
        server.process.wait(timeout=60)
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
    log = server.log_text()
    assert "Distributed model (rank 0 of 2 (tensor parallel))" in log and "rank 0 stops serving" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/health", timeout=2)


def test_a_follower_that_stops_answering_makes_rank_0_answer_503_then_exit(
    directories: dict[str, Path], tmp_path: Path
) -> None:
    """A hung rank (stopped, not dead): after --distributed-timeout, 503 in each dialect's shape, then exit 3."""
    server = launch(directories["qwen3"], "tensor", tmp_path / "ranks.log", "--distributed-timeout", "10")
    follower = rank_pids(port_of(server))[1]
    try:
        os.kill(follower, signal.SIGSTOP)
        deadline = time.monotonic() + 90  # the timeout past twice the slowest step (the warm-up's, on a slow machine)
        while httpx.get(server.base_url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "rank 0 kept answering 200"
            time.sleep(0.2)
        health = httpx.get(server.base_url + "/health", timeout=5).json()
        assert health["status"] == "failed" and "no answer from another rank" in health["reason"]
        openai = httpx.post(
            server.api_url + "/chat/completions",
            timeout=5,
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        anthropic = httpx.post(
            server.base_url + "/v1/messages",
            timeout=5,
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert openai.status_code == 503 and openai.json()["error"]["type"] == "server_error"  # fmt: skip
        assert anthropic.status_code == 529 and anthropic.json()["type"] == "error"
        os.kill(follower, signal.SIGCONT)
        server.process.wait(timeout=60)
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
    assert (
        "rank 0 exited with code 3" in server.log_text() or "Node with rank 0 exited with code 3" in server.log_text()
    )
