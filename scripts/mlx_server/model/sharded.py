"""Each rank loads only its shard of the model, through mlx-lm's sharded loading.

``--parallel tensor`` shards every layer (mlx-lm's ``model.shard(group)``:
Llama, Qwen3, Qwen3 MoE, gpt-oss, DeepSeek, GLM …); ``--parallel pipeline``
gives each rank a run of layers (``model.model.pipeline(group)``: Qwen3 MoE,
Qwen3-Next, Qwen3.5, DeepSeek, GLM MoE …) and reads only that run's weight
files, so it needs ``model.safetensors.index.json``.  A model whose class
cannot be split the asked way is refused with a sentence naming what it
supports; so is anything but an MLX model directory or a repo id (cached, or downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_server.model.generation_config import read_generation_config
from mlx_server.model.loading import LoadedModel, ModelLoadError, file_identity, model_directory, model_identity

__all__ = ["load_shard", "supported_splits"]


def supported_splits(model: Any) -> list[str]:
    """How this mlx-lm model class can be split over several processes."""
    splits = []
    if hasattr(model, "shard"):
        splits.append("tensor")
    if hasattr(model, "model") and hasattr(model.model, "pipeline"):
        splits.append("pipeline")
    return splits


def load_shard(reference: str | None, group: Any, parallel: str) -> LoadedModel:
    """This rank's shard of the model over ``group`` (ModelLoadError with the reason when it cannot be split so)."""
    from mlx_lm.utils import load_model, sharded_load

    if reference is None or reference.lower().endswith(".gguf"):
        raise ModelLoadError(
            "a model served over several processes loads from an MLX model directory or a repo id, not a "
            "GGUF file: write one with --export-mlx DIR (make serve-distributed does this for the default model)"
        )
    directory, kind = model_directory(reference)
    try:
        lazy, config = load_model(directory, lazy=True, strict=False)
    except (ValueError, FileNotFoundError) as error:
        raise ModelLoadError(f"{reference}: {error}") from error
    splits = supported_splits(lazy)
    model_type = config.get("model_type", "?")
    if parallel not in splits:
        supports = " and ".join(f"--parallel {split}" for split in splits) or "neither tensor nor pipeline parallelism"
        raise ModelLoadError(
            f"{directory.name} ({model_type}) cannot be split for --parallel {parallel}: its mlx-lm class "
            f"supports {supports}"
        )
    if parallel == "pipeline" and not (directory / "model.safetensors.index.json").is_file():
        raise ModelLoadError(
            f"{directory.name}: --parallel pipeline reads each rank's layers by model.safetensors.index.json, which "
            "this directory lacks (mlx_lm.convert writes one); use --parallel tensor"
        )
    if parallel == "tensor":
        text = config.get("text_config") or config
        heads = {name: text.get(name) for name in ("num_attention_heads", "num_key_value_heads")}
        uneven = {name: count for name, count in heads.items() if isinstance(count, int) and count % group.size()}
        if uneven:
            said = ", ".join(f"{count} {name.removeprefix('num_').replace('_', ' ')}" for name, count in uneven.items())
            raise ModelLoadError(
                f"{directory.name} has {said}: --parallel tensor splits them evenly over the {group.size()} "
                "processes, so their count must divide by it"
                + (" (or use --parallel pipeline)" if "pipeline" in splits else "")
            )
    groups = {"tensor_group": group} if parallel == "tensor" else {"pipeline_group": group}
    try:
        model, tokenizer, config = cast(
            "tuple[nn.Module, TokenizerWrapper, dict[str, Any]]",
            # mlx-lm's sharded loading allows a tokenizer's remote code unless told otherwise; one process never does
            sharded_load(str(directory), return_config=True, tokenizer_config={"trust_remote_code": False}, **groups),
        )
    except ValueError as error:
        raise ModelLoadError(f"{directory.name} cannot be split over {group.size()} processes: {error}") from error
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=directory.name,
        source=str(directory),
        kind=kind,
        context_length=int(config.get("max_position_embeddings") or config.get("max_seq_len") or 4096),
        quantized="quantization" in config,
        config=config,
        identity=model_identity(file_identity(Path(directory) / "config.json"), parallel, group.rank(), group.size()),
        weight_format=f"{parallel} parallel, rank {group.rank()} of {group.size()}",
        recommended_sampling=read_generation_config(Path(directory)),
    )
