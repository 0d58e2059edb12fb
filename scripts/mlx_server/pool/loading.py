"""Loading a model for the pool: a chat model loaded and assembled (``assembly``), or an embedding model.

Before a load, the weights are estimated from the model's files (a cached
repo's included), so that idle models can be unloaded to make room first,
and a source that cannot be found is refused before anything is unloaded.
A chat model's KV budget is ``--kv-budget``, its ``kv_budget`` in the models
config, or by default a quarter of physical memory shared by the configured
chat models.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlx_server.agent_environment import ClaudeCodeEnvironment
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.engine.embedding import EmbeddingEngine
from mlx_server.engine.kv_budget import default_budget_bytes
from mlx_server.engine.lockstep import Lockstep
from mlx_server.mlx_lm_compat import IncompatibleMlxLmError, check
from mlx_server.model.default_model import find_default_model
from mlx_server.model.embedding_models import load_embedding_model
from mlx_server.model.loading import LoadedModel, ModelLoadError, load_model, model_directory
from mlx_server.model.sharded import load_shard
from mlx_server.pool.assembly import ChatModel, EmbeddingModel, assemble_chat
from mlx_server.pool.memory import describe_bytes
from mlx_server.pool.pool import Served
from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings
from mlx_server.vocabulary import ModelUnavailableError
from utils_logging import debug

__all__ = ["ModelLoader"]

logger = logging.getLogger("mlx")

#: A float32 copy of quantized GGUF weights on a CPU is about this many times the file.
GGUF_FLOAT32_GROWTH = 8
#: What an embedding model needs beside its weights: the activations of one batch.
EMBEDDING_HEADROOM_BYTES = 256 * 1024**2


class ModelLoader:
    """Builds what serves each model, with the server's settings (a ``pool.Loader``)."""

    def __init__(self, settings: Settings, registry: Registry, lockstep: Lockstep | None = None) -> None:
        self.settings = settings
        self.lockstep = lockstep  # a model split over several processes: this rank's side of their steps
        self._chat_models = sum(spec.kind == "chat" for spec in registry.models)
        self._first_chat = registry.default("chat")

    def kv_budget(self, spec: ModelSpec) -> int:
        """The KV memory this chat model may use: its own setting, --kv-budget, or its share of the default."""
        return spec.kv_budget or self.settings.kv_budget or default_budget_bytes() // max(1, self._chat_models)

    def estimate(self, spec: ModelSpec) -> int:
        """Its weights from its files (a repo id's, downloaded first when not cached) and its KV budget;
        ModelUnavailableError if not found."""
        try:
            weights = _weights_on_disk(spec.source)
        except ModelLoadError as error:
            raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: {error}") from error
        return weights + (self.kv_budget(spec) if spec.kind == "chat" else EMBEDDING_HEADROOM_BYTES)

    def load(self, spec: ModelSpec) -> Served:
        try:
            return self.load_chat(spec) if spec.kind == "chat" else self._load_embedding(spec)
        except (ModelLoadError, IncompatibleMlxLmError) as error:
            raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: {error}") from error

    def load_chat(self, spec: ModelSpec) -> ChatModel:
        """The chat model loaded (this rank's shard, in lockstep) and assembled; warm unless it follows rank 0.

        ModelLoadError or IncompatibleMlxLmError when it cannot be.
        """
        settings = self.settings
        started = time.perf_counter()
        loaded = self._loaded(spec)
        logger.info(
            "Model %s (%s) loaded in %.1fs (%s, %s weights: %s, context %d tokens) on %s",
            spec.name,
            loaded.name,
            time.perf_counter() - started,
            loaded.kind,
            "quantized" if loaded.quantized else "float32" if loaded.kind == "gguf" else "native",
            loaded.weight_format,
            min(loaded.context_length, spec.context_length or loaded.context_length),
            loaded.device,
        )
        debug(2, "Model config", loaded.config)
        budget = self.kv_budget(spec)
        directory = settings.prompt_cache_dir
        if directory is not None and self.lockstep is not None:
            directory = directory / f"rank-{self.lockstep.run.rank}"  # each rank keeps its own shard's checkpoints
        model = assemble_chat(loaded, spec, settings, budget, self.lockstep, directory)
        engine, cache = model.engine, model.prompt_cache
        logger.info(
            "%s: batching up to %d sequences, %d prompts prefilled together; KV budget %s (%d bytes per token%s, "
            "%d tokens for one sequence); prompt cache %s",
            spec.name,
            engine.max_batch,
            min(settings.prefill_batch, engine.max_batch),
            describe_bytes(budget),
            engine.budget.bytes_per_token,
            f", {engine.options.kv_bits}-bit" if engine.options.kv_bits else "",
            engine.budget.max_sequence_tokens,
            f"up to {cache.max_entries} entries, {describe_bytes(cache.max_bytes)}" if cache.enabled else "off",
        )
        if self.lockstep is not None and not self.lockstep.leader:
            return model  # it follows rank 0's steps, the warm-up's included
        if loaded.vision is not None:
            logger.info("Model %s reads images (%s, through mlx-vlm)", spec.name, loaded.vision.family)
        logger.info("%s", model.service.sampling_line())
        if spec is self._first_chat:
            logger.info("%s, before this model's %d-token context is full", ClaudeCodeEnvironment(
                engine.context_length).line(), engine.context_length)  # fmt: skip
        logger.info("%s: warm-up generation took %.0fms", spec.name, engine.warm_up())
        return model

    def _loaded(self, spec: ModelSpec) -> LoadedModel:
        if self.lockstep is not None:
            loaded = load_shard(spec.source, self.lockstep.run.group, self.lockstep.run.parallel)
        else:
            loaded = load_model(spec.source, dequantize=self.settings.dequantize)
        check(loaded.model, loaded.tokenizer)
        for warning in loaded.warnings:
            logger.warning("%s", warning)
        return loaded

    def _load_embedding(self, spec: ModelSpec) -> EmbeddingModel:
        assert spec.source is not None, "an embedding model always names its source"
        started = time.perf_counter()
        loaded = load_embedding_model(spec.source)
        if spec.context_length is not None:
            loaded.context_length = min(loaded.context_length, spec.context_length)
        engine = EmbeddingEngine(loaded)
        logger.info(
            "Embedding model %s (%s) loaded in %.1fs (%s through %s, %d dimensions, %s pooling%s, context %d tokens)",
            spec.name,
            loaded.name,
            time.perf_counter() - started,
            describe_bytes(loaded.weights_bytes),
            "mlx-lm" if loaded.architecture == "decoder" else "mlx-embeddings",
            loaded.dimensions,
            loaded.pooling.mode.replace("_", " "),
            ", normalized" if loaded.pooling.normalize else "",
            loaded.context_length,
        )
        service = EmbeddingService(spec.name, engine, self.settings.max_embedding_tokens)
        return EmbeddingModel(service, engine, loaded.weights_bytes + EMBEDDING_HEADROOM_BYTES)


def _weights_on_disk(source: str | None) -> int:
    """The bytes the model's weights will take once loaded, from its files (a cached repo's blobs included).

    ModelLoadError, with the sentence a load would give, when the source cannot be found.
    """
    try:
        path = find_default_model() if source is None else Path(source).expanduser()
    except FileNotFoundError as error:
        raise ModelLoadError(str(error)) from error
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path.stat().st_size * GGUF_FLOAT32_GROWTH
    directory, _ = model_directory(str(path) if source is None else source)
    return sum(file.stat().st_size for file in directory.glob("*.safetensors"))
