"""Resolve ``--model`` to a loaded model: a GGUF file, an MLX directory, or a Hugging Face repo id.

Every failure becomes a ModelLoadError with a message a person can act on
(a missing file, an unsupported architecture, a repo that is not cached while
offline or not on the hub), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_reduce
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from mlx_server.machine import physical_memory_bytes
from mlx_server.mlx_lm_compat import hf_tokenizer
from mlx_server.model.default_model import find_default_model
from mlx_server.model.generation_config import DEFAULT_MODEL_SAMPLING, read_generation_config
from mlx_server.model.gguf import UnsupportedGgufError, load_gguf
from mlx_server.model.hub import HubError, fetch
from mlx_server.model.vision import (
    VisionTower,
    VisionUnavailableError,
    images_left_out,
    load_vision,
)
from mlx_server.model.weight_format import UnrunnableModelError, moe_on_cpu
from mlx_server.vocabulary import RecommendedSampling

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "cached_repo",
    "export_mlx_model",
    "file_identity",
    "load_model",
    "model_directory",
    "model_identity",
]


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """Everything generation needs about the model, and what /health reports."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    name: str
    source: str
    kind: str
    context_length: int
    quantized: bool
    config: dict[str, Any]
    identity: str
    weight_format: str = "as saved"  # and why, for the start-up line
    warnings: list[str] = field(default_factory=list)
    recommended_sampling: RecommendedSampling = field(default_factory=RecommendedSampling)
    vision: VisionTower | None = None  # a vision model's image side (None: the model reads text only)

    @property
    def device(self) -> str:
        device = mx.default_device()
        return "gpu" if device.type == mx.DeviceType.gpu else "cpu"

    @property
    def weights_bytes(self) -> int:
        """The memory its weights take, as loaded (a vision model's tower included)."""
        text = int(tree_reduce(lambda total, parameter: total + parameter.nbytes, self.model.parameters(), 0))
        return text + (self.vision.weights_bytes if self.vision is not None else 0)

    def describe(self) -> dict[str, Any]:
        """What /health says of the model."""
        return {
            "model": self.name,
            "model_source": self.source,
            "model_kind": self.kind,
            "quantized": self.quantized,
            "device": self.device,
            "context_length": self.context_length,
            "reads_images": self.vision is not None,
        }


def model_identity(*parts: object) -> str:
    """A stable id of the model's weights and settings, for cache keys."""
    return hashlib.sha256(json.dumps([str(part) for part in parts]).encode()).hexdigest()[:16]


def file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _load_gguf_file(path: Path, dequantize: bool | None) -> LoadedModel:
    try:
        loaded = load_gguf(path, dequantize=dequantize)
    except UnsupportedGgufError as error:
        raise ModelLoadError(f"{path.name}: {error}") from error
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{path}: not a readable GGUF model ({error})") from error
    tokenizer = TokenizerWrapper(loaded.tokenizer, detokenizer_class=BPEStreamingDetokenizer)
    return LoadedModel(
        model=loaded.model,
        tokenizer=tokenizer,
        name=path.stem,
        source=str(path),
        kind="gguf",
        context_length=loaded.context_length,
        quantized=loaded.quantized,
        config=loaded.config,
        identity=model_identity(file_identity(path), loaded.quantized),
        weight_format=loaded.weight_format,
        warnings=loaded.warnings,
    )


def _load_with_mlx_lm(reference: str, display_name: str, kind: str, identity: str) -> LoadedModel:
    from mlx_lm.utils import load

    try:
        model, tokenizer, config = cast(
            "tuple[nn.Module, TokenizerWrapper, dict[str, Any]]", load(reference, return_config=True)
        )
    except FileNotFoundError as error:
        raise ModelLoadError(f"{reference}: {error}") from error
    except ValueError as error:
        raise ModelLoadError(f"{reference}: {error}") from error
    context_length = int(config.get("max_position_embeddings") or config.get("max_seq_len") or 4096)
    weight_format = _runnable_on_this_device(model, reference)
    try:
        vision = load_vision(Path(reference), model, config)
    except VisionUnavailableError as error:
        raise ModelLoadError(str(error)) from error
    left_out = images_left_out(config, display_name)
    return LoadedModel(
        vision=vision,
        warnings=[left_out] if left_out is not None else [],
        recommended_sampling=read_generation_config(Path(reference)),
        model=model,
        tokenizer=tokenizer,
        name=display_name,
        source=reference,
        kind=kind,
        context_length=context_length,
        quantized="quantization" in config,
        config=config,
        identity=identity,
        weight_format=weight_format,
    )


def _runnable_on_this_device(model: nn.Module, reference: str) -> str:
    """A half-precision MoE model on a CPU is cast to float32 when it fits, else refused; returns what was done."""
    if mx.default_device().type == mx.DeviceType.gpu:
        return "as saved"
    experts = [module for _, module in model.named_modules() if type(module).__name__ == "SwitchLinear"]
    half = {str(module.weight.dtype) for module in experts if module.weight.dtype in (mx.float16, mx.bfloat16)}
    if not half:
        return "as saved"
    float32_bytes = 4 * int(tree_reduce(lambda total, parameter: total + parameter.size, model.parameters(), 0))
    try:
        chosen = moe_on_cpu(", ".join(sorted(half)).replace("mlx.core.", ""), float32_bytes, physical_memory_bytes())
    except UnrunnableModelError as error:
        raise ModelLoadError(f"{reference}: {error}") from error
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return chosen.reason


def cached_repo(repo_id: str) -> Path:
    """A Hugging Face repo id's directory: from the local cache, or downloaded into it (``hub``)."""
    try:
        return fetch(repo_id)
    except HubError as error:
        raise ModelLoadError(str(error)) from error


def model_directory(reference: str) -> tuple[Path, str]:
    """An MLX model directory or a repo id (cached, or downloaded now): its directory, and its kind (``mlx`` or
    ``huggingface``)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but not an MLX model (no config.json)")
        return path, "mlx"
    if path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file nor an MLX model directory")
    if os.sep in reference.strip("/").replace("/", "", 1) or reference.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path not found: {reference}")
    return cached_repo(reference), "huggingface"


def load_model(reference: str | None, dequantize: bool | None = None) -> LoadedModel:
    """Load ``reference`` (None: the bundled default); raises ModelLoadError with a clear reason.

    ``dequantize`` applies to quantized GGUF weights: None chooses by device and
    memory (see weight_format), True or False forces float32 or quantized.
    """
    if reference is None:
        try:
            default = _load_gguf_file(find_default_model(), dequantize)
        except FileNotFoundError as error:
            raise ModelLoadError(str(error)) from error
        default.recommended_sampling = DEFAULT_MODEL_SAMPLING
        return default
    path = Path(reference).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return _load_gguf_file(path, dequantize)
    directory, kind = model_directory(reference)
    if kind == "mlx":
        return _load_with_mlx_lm(
            str(directory), directory.name, kind, model_identity(file_identity(directory / "config.json"))
        )
    return _load_with_mlx_lm(str(directory), reference, kind, model_identity(reference, directory.name))


def export_mlx_model(loaded: LoadedModel, destination: Path) -> Path:
    """Write the loaded weights as an MLX model directory that mlx-lm's own tools can load."""
    from mlx_lm.utils import save_config, save_model

    destination.mkdir(parents=True, exist_ok=True)
    save_model(destination, loaded.model)
    save_config(dict(loaded.config), destination / "config.json")
    hf_tokenizer(loaded.tokenizer).save_pretrained(str(destination))
    return destination
