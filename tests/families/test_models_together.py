"""Several real models in one server process: two chat models of different families and two embedding models.

Tiny random-weight models built from mlx-lm's and mlx-embeddings' own classes,
with real tokenizers, served over real HTTP: routing by name and alias, loading
on demand while another model streams, unloading (asked, after a TTL, for room
under a budget that holds one chat model), pinning, the prompt cache written
on unload and read back on load, and embeddings equal to the pooled forward
pass computed here from the models themselves, through the ``openai`` SDK and
litellm too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import numpy as np
import pytest
from openai import OpenAI

from testbed.tiny_models import build_decoder_embedding, build_encoder_embedding
from tests.server.conftest import RunningServer, start_server, stop_server

SYSTEM = "You are the release manager of a small project. Keep every answer short and precise. " * 3


@pytest.fixture(scope="module")
def embedding_directories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embedders")
    return {"decoder": build_decoder_embedding(root / "qwen3-embed"), "encoder": build_encoder_embedding(root / "bert")}


def serve(tmp_path: Path, *arguments: str) -> RunningServer:
    return start_server(tmp_path / "server.log", arguments=["--kv-budget", "64M", "--response-cache-size", "0",
                                                            "--default-temperature", "0", *arguments])  # fmt: skip


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, model_directories: dict[str, Path], embedding_directories: dict[str, Path]
) -> Iterator[RunningServer]:
    running = serve(
        tmp_path_factory.mktemp("together"),
        "--model", f"main={model_directories['qwen3']}", "--model", f"small={model_directories['llama']}",
        "--embedding-model", f"embed={embedding_directories['decoder']}",
        "--embedding-model", f"bert={embedding_directories['encoder']}",
        "--alias", "claude-haiku-*=small",
    )  # fmt: skip
    yield running
    stop_server(running)


def chat(server: RunningServer, model: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
    return httpx.post(server.api_url + "/chat/completions", json=body, timeout=120)


def states(server: RunningServer) -> dict[str, str]:
    return {card["id"]: card["state"] for card in httpx.get(server.api_url + "/models", timeout=10).json()["data"]}


def wait_for(server: RunningServer, expected: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if states(server).items() >= expected.items():
            return
        time.sleep(0.1)
    raise AssertionError(f"states stayed {states(server)}, expected {expected}")


class TestRouting:
    def test_names_aliases_and_the_default(self, server: RunningServer) -> None:
        assert chat(server, "small").json()["model"] == "small"
        assert chat(server, "claude-haiku-4-5").json()["model"] == "small"
        assert chat(server, "gpt-4o").json()["model"] == "main"
        assert chat(server, "embed").status_code == 400

    def test_a_model_loads_while_another_streams(self, server: RunningServer) -> None:
        httpx.post(server.base_url + "/models/unload", json={"model": "small"}, timeout=60)
        streamed: list[str] = []

        def stream_main() -> None:
            body = {"model": "main", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", server.api_url + "/chat/completions", json=body, timeout=120) as response:
                streamed.extend(response.iter_lines())

        streaming = threading.Thread(target=stream_main)
        streaming.start()
        reply = chat(server, "small")
        streaming.join()
        assert reply.status_code == 200 and reply.json()["model"] == "small"
        assert [line for line in streamed if line][-1] == "data: [DONE]"


class TestEmbeddings:
    def pooled(self, directory: Path, texts: list[str]) -> np.ndarray[Any, Any]:
        """The last token's final hidden state, normalized, computed here from mlx-lm's model directly."""
        from mlx_lm import load

        loaded = load(str(directory))
        model, tokenizer = loaded[0], loaded[1]
        vectors = []
        for text in texts:
            states = model.model(mx.array([tokenizer.encode(text)]))[0, -1]
            vectors.append(np.array(states / mx.linalg.norm(states)))
        return np.stack(vectors)

    def test_equal_to_the_models_own_pooled_forward_pass(
        self, server: RunningServer, embedding_directories: dict[str, Path]
    ) -> None:
        texts = ["hello world", "a much longer sentence about the sea and the ships on it", "x"]
        reply = httpx.post(server.api_url + "/embeddings", json={"model": "embed", "input": texts}, timeout=120).json()
        served = np.array([item["embedding"] for item in reply["data"]])
        assert np.allclose(served, self.pooled(embedding_directories["decoder"], texts), atol=1e-4)

    def test_a_batch_equals_each_input_alone(self, server: RunningServer) -> None:
        texts = ["short", "a somewhat longer input that needs more tokens", "mid length text"]
        together = httpx.post(server.api_url + "/embeddings", json={"model": "bert", "input": texts}, timeout=60)
        alone = [httpx.post(server.api_url + "/embeddings", json={"model": "bert", "input": text}, timeout=60)
                 for text in texts]  # fmt: skip
        batched = np.array([item["embedding"] for item in together.json()["data"]])
        single = np.array([response.json()["data"][0]["embedding"] for response in alone])
        assert np.allclose(batched, single, atol=1e-5)

    def test_an_encoder_model_through_mlx_embeddings(
        self, server: RunningServer, embedding_directories: dict[str, Path]
    ) -> None:
        from mlx_embeddings.utils import load

        model, tokenizer = load(str(embedding_directories["encoder"]))
        ids = tokenizer.encode("hello world")
        expected = np.array(model(mx.array([ids]), attention_mask=mx.ones((1, len(ids)))).text_embeds[0])
        reply = httpx.post(server.api_url + "/embeddings", json={"model": "bert", "input": [ids]}, timeout=60).json()
        assert np.allclose(reply["data"][0]["embedding"], expected, atol=1e-4)

    def test_the_openai_sdk(self, server: RunningServer) -> None:
        client = OpenAI(base_url=server.api_url, api_key="local")
        result = client.embeddings.create(model="embed", input=["one", "two"], dimensions=16)
        assert [len(item.embedding) for item in result.data] == [16, 16] and result.model == "embed"
        assert np.isclose(np.linalg.norm(result.data[0].embedding), 1.0, atol=1e-4)
        assert result.usage.prompt_tokens > 0

    def test_litellm(self, server: RunningServer) -> None:
        import litellm

        result = litellm.embedding(model="openai/embed", input=["hello"], api_base=server.api_url, api_key="local")
        assert len(result.data[0]["embedding"]) == 64


class TestLifecycle:
    def test_a_budget_for_one_chat_model_unloads_the_other_and_a_ttl_unloads_the_idle_one(
        self, tmp_path: Path, model_directories: dict[str, Path]
    ) -> None:
        """Two 64 MiB KV budgets and two tiny models do not fit 100 MiB: asking for one unloads the other."""
        running = serve(tmp_path, "--model", f"main={model_directories['qwen3']}",
                        "--model", f"small={model_directories['llama']}", "--memory-budget", "100M",
                        "--model-ttl", "2")  # fmt: skip
        try:
            assert states(running) == {"main": "loaded", "small": "unloaded"}
            assert chat(running, "small").json()["model"] == "small"
            assert states(running) == {"main": "unloaded", "small": "loaded"}
            wait_for(running, {"small": "unloaded"})  # idle past its two-second TTL
            assert "unloaded (idle for 2s)" in running.log_text()
        finally:
            stop_server(running)

    def test_a_pinned_model_stays_and_what_cannot_fit_is_a_clear_error(
        self, tmp_path: Path, model_directories: dict[str, Path]
    ) -> None:
        config = tmp_path / "models.toml"
        config.write_text(
            f'[models.main]\nsource = "{model_directories["qwen3"]}"\npinned = true\n'
            f'[models.small]\nsource = "{model_directories["llama"]}"\naliases = ["claude-haiku-*"]\n'
        )
        running = serve(tmp_path, "--models-config", str(config), "--memory-budget", "100M")
        try:
            refused = httpx.post(running.base_url + "/v1/messages", json={
                "model": "claude-haiku-4-5", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
                timeout=60)  # fmt: skip
            assert refused.status_code == 529 and "main (" in refused.json()["error"]["message"]
            assert "pinned" in refused.json()["error"]["message"]
            assert states(running) == {"main": "loaded", "small": "unloaded"}
            unload = httpx.post(running.base_url + "/models/unload", json={"model": "main"}, timeout=60)
            assert unload.status_code == 409 and unload.json()["error"]["code"] == "model_pinned"
            assert states(running) == {"main": "loaded", "small": "unloaded"}
        finally:
            stop_server(running)

    def test_the_prompt_cache_is_written_on_unload_and_read_on_load(
        self, tmp_path: Path, model_directories: dict[str, Path]
    ) -> None:
        running = serve(tmp_path, "--model", f"main={model_directories['qwen3']}",
                        "--prompt-cache-dir", str(tmp_path / "cache"))  # fmt: skip
        try:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is next?"}]
            assert chat(running, "main", messages=messages).status_code == 200
            httpx.post(running.base_url + "/models/unload", json={"model": "main"}, timeout=60)
            assert list((tmp_path / "cache").glob("*.safetensors")), "the checkpoint was written on unload"
            messages[-1]["content"] = "And after that?"
            reloaded = chat(running, "main", messages=messages)
            assert reloaded.headers["x-prompt-cache-source"] == "checkpoint"
            assert reloaded.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        finally:
            stop_server(running)
