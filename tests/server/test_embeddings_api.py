"""``POST /v1/embeddings`` in OpenAI's shape: inputs as text or token ids, float or base64, dimensions, errors.

A scripted embedder stands in for the model (each input's vector is a fixed
function of its tokens, normalized), so the wire format and the request's
rules are specified exactly; tests/families/test_models_together.py proves real models.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings

from .scripted import ScriptedEmbedder, ScriptedModels, scripted_models

EMBEDDINGS = "/v1/embeddings"
REGISTRY = Registry((ModelSpec("chat", None), ModelSpec("embed", "/m/embed", "embedding")))


@pytest.fixture(scope="module")
def served() -> ScriptedModels:
    return scripted_models(REGISTRY)


def embed(served: ScriptedModels, **body: Any) -> Any:
    response = served.client.post(EMBEDDINGS, json={"model": "text-embedding-3-small", **body})
    assert response.status_code == 200, response.text
    return response.json()


def tokens(served: ScriptedModels, text: str) -> list[int]:
    return [int(token) for token in served.embedder("embed").tokenizer.encode(text)]


class TestTheReply:
    def test_one_text(self, served: ScriptedModels) -> None:
        reply = embed(served, input="hello world")
        (item,) = reply["data"]
        assert reply["object"] == "list" and reply["model"] == "embed"
        assert item["object"] == "embedding" and item["index"] == 0
        assert np.allclose(item["embedding"], ScriptedEmbedder.vector(tokens(served, "hello world")))
        assert reply["usage"] == {"prompt_tokens": len(tokens(served, "hello world")),
                                  "total_tokens": len(tokens(served, "hello world"))}  # fmt: skip

    def test_several_texts_in_order(self, served: ScriptedModels) -> None:
        texts = ["one", "two three", "four five six"]
        reply = embed(served, input=texts)
        assert [item["index"] for item in reply["data"]] == [0, 1, 2]
        for text, item in zip(texts, reply["data"]):
            assert np.allclose(item["embedding"], ScriptedEmbedder.vector(tokens(served, text)))

    def test_token_ids_are_the_models_own(self, served: ScriptedModels) -> None:
        ids = tokens(served, "hello world")
        single, several = embed(served, input=ids), embed(served, input=[ids, ids[:1]])
        assert np.allclose(single["data"][0]["embedding"], ScriptedEmbedder.vector(ids))
        assert len(several["data"]) == 2 and several["usage"]["prompt_tokens"] == len(ids) + 1

    def test_base64_is_little_endian_float32(self, served: ScriptedModels) -> None:
        floats = embed(served, input="hello")["data"][0]["embedding"]
        packed = embed(served, input="hello", encoding_format="base64")["data"][0]["embedding"]
        assert np.array_equal(np.frombuffer(base64.b64decode(packed), dtype="<f4"), np.array(floats, dtype=np.float32))

    def test_dimensions_keep_the_first_components_at_length_one(self, served: ScriptedModels) -> None:
        full = np.array(embed(served, input="hello")["data"][0]["embedding"])
        cut = np.array(embed(served, input="hello", dimensions=4)["data"][0]["embedding"])
        assert cut.shape == (4,) and np.isclose(np.linalg.norm(cut), 1.0)
        assert np.allclose(cut, full[:4] / np.linalg.norm(full[:4]))


class TestBadRequests:
    @pytest.mark.parametrize(
        ("body", "param", "fragment"),
        [
            ({"input": []}, "input", "must not be empty"),
            ({"input": ""}, "input", "is empty"),
            ({"input": ["fine", ""]}, "input[1]", "is empty"),
            ({"input": [10**9]}, "input", "token ids must be in"),
            ({"input": "word " * 200}, "input", "maximum context length is 64 tokens"),
            ({"input": "hello", "dimensions": 17}, "dimensions", "between 1 and this model's 16"),
            ({"input": "hello", "dimensions": 0}, "dimensions", ""),
            ({"input": "hello", "encoding_format": "int8"}, "encoding_format", ""),
            ({"input": [[1, 2], "mixed"]}, "input", ""),
        ],
    )
    def test_a_clear_400_naming_the_field(
        self, served: ScriptedModels, body: dict[str, Any], param: str, fragment: str
    ) -> None:
        response = served.client.post(EMBEDDINGS, json={"model": "embed", **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] is not None and error["param"].startswith(param) and fragment in error["message"]

    def test_at_most_2048_inputs_in_one_request(self, served: ScriptedModels) -> None:
        """20,000 token-id inputs in a small body once answered with a 27 MB reply."""
        response = served.client.post(EMBEDDINGS, json={"model": "embed", "input": [[1]] * 2049})
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_inputs"
        assert served.embedder("embed").calls[-1:] != [[[1]] * 2049], "nothing was embedded"
        assert len(embed(served, model="embed", input=[[1]] * 2048)["data"]) == 2048

    def test_a_token_budget_per_request(self) -> None:
        bounded = scripted_models(REGISTRY, Settings(default_temperature=0.0, max_embedding_tokens=10))
        refused = bounded.client.post(EMBEDDINGS, json={"model": "embed", "input": ["one two three four"] * 4})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_tokens"
        assert "--max-embedding-tokens" in refused.json()["error"]["message"] and not bounded.embedder("embed").calls
        assert bounded.client.post(EMBEDDINGS, json={"model": "embed", "input": "one two"}).status_code == 200

    def test_an_embeddings_request_to_a_chat_model_is_refused(self, served: ScriptedModels) -> None:
        response = served.client.post(EMBEDDINGS, json={"model": "chat", "input": "hello"})
        assert response.status_code == 400 and "chat model" in response.json()["error"]["message"]
