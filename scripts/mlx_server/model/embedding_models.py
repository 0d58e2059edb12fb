"""Resolve ``--embedding-model`` to a loaded embedding model: a decoder (mlx-lm) or an encoder (mlx-embeddings).

Decoder embedding models (Qwen3-Embedding and kin) are mlx-lm's own model
classes: the transformer's last hidden states, pooled.  Encoder models
(BERT, ModernBERT, XLM-RoBERTa: bge, e5, nomic) need mlx-embeddings, an
optional extra (it brings mlx-vlm and about 1 GB of dependencies); without
it such a model is refused with the command that installs it.

How the hidden states become one vector is read from the model's
sentence-transformers files where it has them (``modules.json``,
``1_Pooling/config.json``, a ``Normalize`` module); otherwise a decoder
takes its last token and an encoder the mean of its tokens, normalized.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_reduce

from mlx_server.model.loading import ModelLoadError, file_identity, model_directory, model_identity

__all__ = ["ENCODER_TYPES", "LoadedEmbedder", "Pooling", "load_embedding_model", "read_pooling"]

PoolingMode = Literal["last_token", "mean", "cls"]
ENCODER_TYPES = frozenset({"bert", "modernbert", "xlm_roberta", "roberta", "nomic_bert", "distilbert"})
INSTALL_ENCODERS = "pip install -e '.[vision]' (make install-vision), which brings mlx-embeddings"


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: which tokens, and whether the vector is scaled to length 1."""

    mode: PoolingMode
    normalize: bool = True


@dataclass
class LoadedEmbedder:
    """An embedding model ready to run: ``architecture`` says how it is called (``engine.embedding``)."""

    model: nn.Module
    tokenizer: Any  # a Hugging Face tokenizer
    name: str
    source: str
    identity: str
    architecture: Literal["decoder", "encoder"]
    context_length: int
    dimensions: int
    pooling: Pooling

    @property
    def weights_bytes(self) -> int:
        return int(tree_reduce(lambda total, parameter: total + parameter.nbytes, self.model.parameters(), 0))


def read_pooling(directory: Path, default: Pooling) -> Pooling:
    """The pooling the model's sentence-transformers files declare, or ``default`` when it has none."""
    modules_file = directory / "modules.json"
    try:
        modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    except (OSError, ValueError):
        modules = []
    pooling_path = next((m.get("path") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling_path is None:
        return default
    try:
        config = json.loads((directory / pooling_path / "config.json").read_text())
    except (OSError, ValueError):
        return default
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    if config.get("pooling_mode_lasttoken"):
        return Pooling("last_token", normalize)
    if config.get("pooling_mode_cls_token"):
        return Pooling("cls", normalize)
    return Pooling("mean", normalize)


def load_embedding_model(reference: str) -> LoadedEmbedder:
    """Load ``reference`` (an MLX directory, or a repo id: downloaded if not cached); a clear ModelLoadError."""
    directory, kind = model_directory(reference)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{directory}/config.json not read: {error}") from error
    model_type = str(config.get("model_type", "")).replace("-", "_")
    name = directory.name if kind == "mlx" else reference
    identity = model_identity(file_identity(directory / "config.json"), "embedding")
    context = int(config.get("max_position_embeddings") or 512)
    dimensions = int(config.get("hidden_size") or 0)
    if model_type not in ENCODER_TYPES and importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None:
        model, tokenizer = _load_decoder(directory)
        pooling = read_pooling(directory, Pooling("last_token"))
        return LoadedEmbedder(model, tokenizer, name, reference, identity, "decoder", context, dimensions, pooling)
    if importlib.util.find_spec("mlx_embeddings") is None:
        raise ModelLoadError(f"{name} is a {model_type or 'non-decoder'} embedding model, which needs mlx-embeddings: "
                             f"{INSTALL_ENCODERS}")  # fmt: skip
    model, tokenizer = _load_encoder(directory, model_type)
    pooling = read_pooling(directory, Pooling("mean"))
    return LoadedEmbedder(model, tokenizer, name, reference, identity, "encoder", context, dimensions, pooling)


def _load_decoder(directory: Path) -> tuple[nn.Module, Any]:
    from mlx_lm.utils import load

    try:
        loaded = load(str(directory))
    except (FileNotFoundError, ValueError) as error:
        raise ModelLoadError(f"{directory}: {error}") from error
    model, tokenizer = loaded[0], loaded[1]
    mx.eval(model.parameters())
    return model, tokenizer


def _load_encoder(directory: Path, model_type: str) -> tuple[nn.Module, Any]:
    from mlx_embeddings.utils import load

    try:
        model, tokenizer = load(str(directory))
    except (FileNotFoundError, ValueError) as error:
        raise ModelLoadError(f"{directory}: {model_type} model not loaded by mlx-embeddings ({error})") from error
    return model, tokenizer
