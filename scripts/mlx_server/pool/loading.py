"""Loading a model for the pool: a chat model's engine, prompt cache, profile and service; an embedding model's.

What each model takes from the one memory budget is its weights (measured
once loaded) and, for a chat model, its KV budget (``--kv-budget``, its
``kv_budget`` in the models config, or by default a quarter of physical
memory shared by the configured chat models): the batch and the prompt cache
never hold more.  Before a load, the weights are estimated from the model's
files, so that idle models can be unloaded to make room first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mlx_server.agent_environment import ClaudeCodeEnvironment
from mlx_server.chat.answer_cache import AnswerCache
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.service import ChatService, ServiceOptions
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.engine.embedding import EmbeddingEngine
from mlx_server.engine.generation import EngineOptions, GenerationEngine
from mlx_server.engine.kv_budget import default_budget_bytes
from mlx_server.engine.lockstep import Lockstep
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.mlx_lm_compat import IncompatibleMlxLmError, check
from mlx_server.model.default_model import find_default_model
from mlx_server.model.embedding_models import load_embedding_model
from mlx_server.model.loading import LoadedModel, ModelLoadError, load_model, model_directory
from mlx_server.model.sharded import load_shard
from mlx_server.pool.memory import describe_bytes
from mlx_server.pool.pool import Served
from mlx_server.pool.registry import ModelSpec, Registry
from mlx_server.settings import Settings
from mlx_server.vocabulary import ModelUnavailableError
from utils_logging import debug

__all__ = ["ChatModel", "EmbeddingModel", "ModelLoader"]

logger = logging.getLogger("mlx")

#: A float32 copy of quantized GGUF weights on a CPU is about this many times the file.
GGUF_FLOAT32_GROWTH = 8
#: What an embedding model needs beside its weights: the activations of one batch.
EMBEDDING_HEADROOM_BYTES = 256 * 1024**2


@dataclass
class ChatModel:
    """A loaded chat model: its service and what serves it."""

    service: ChatService
    engine: GenerationEngine
    prompt_cache: KVPromptCache
    loaded: LoadedModel
    memory_bytes: int
    save_checkpoints: bool

    def busy(self) -> bool:
        stats = self.engine.stats()
        return self.service.in_flight > 0 or stats.waiting > 0 or stats.running > 0

    def close(self, drain_seconds: float) -> None:
        self.engine.shutdown(drain_seconds)
        if self.save_checkpoints:
            saved = self.prompt_cache.save_checkpoints()
            logger.info("Prompt cache of %s: saved %d checkpoints", self.service.name, saved)


@dataclass
class EmbeddingModel:
    """A loaded embedding model: its service and its engine."""

    service: EmbeddingService
    engine: EmbeddingEngine
    memory_bytes: int

    def busy(self) -> bool:
        return self.service.busy()

    def close(self, drain_seconds: float) -> None:
        self.engine.shutdown(drain_seconds)


class ModelLoader:
    """Builds what serves each model, with the server's settings (a ``pool.Loader``)."""

    def __init__(
        self, settings: Settings, registry: Registry, options: ServiceOptions, lockstep: Lockstep | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.lockstep = lockstep  # a model split over several processes: this rank's side of their steps
        self._chat_models = sum(spec.kind == "chat" for spec in registry.models)
        self._first_chat = registry.default("chat")

    def kv_budget(self, spec: ModelSpec) -> int:
        """The KV memory this chat model may use: its own setting, --kv-budget, or its share of the default."""
        return spec.kv_budget or self.settings.kv_budget or default_budget_bytes() // max(1, self._chat_models)

    def estimate(self, spec: ModelSpec) -> int:
        """Its weights from its files (a cached repo's too) and its KV budget; ModelUnavailableError if not found."""
        try:
            weights = _weights_on_disk(spec.source)
        except ModelLoadError as error:
            raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: {error}") from error
        return weights + (self.kv_budget(spec) if spec.kind == "chat" else EMBEDDING_HEADROOM_BYTES)

    def load(self, spec: ModelSpec) -> Served:
        try:
            return self._load_chat(spec) if spec.kind == "chat" else self._load_embedding(spec)
        except (ModelLoadError, IncompatibleMlxLmError) as error:
            raise ModelUnavailableError(f"model {spec.name!r} cannot be loaded: {error}") from error

    def _load_chat(self, spec: ModelSpec) -> ChatModel:
        settings = self.settings
        engine, prompt_cache, loaded, budget = self.engine(spec)
        recommended = loaded.recommended_sampling if settings.generation_config == "auto" else None
        profile = ModelProfile(loaded.tokenizer, engine.context_length, recommended, spec.sampling, loaded.vision)
        if loaded.vision is not None:
            logger.info("Model %s reads images (%s, through mlx-vlm)", spec.name, loaded.vision.family)
        answers = AnswerCache(loaded.identity, settings.response_cache_size)
        service = ChatService(engine, self.options, answers, profile=profile, name=spec.name)
        logger.info("%s", service.sampling_line())
        if spec is self._first_chat:
            logger.info("%s, before this model's %d-token context is full", ClaudeCodeEnvironment(
                engine.context_length).line(), engine.context_length)  # fmt: skip
        logger.info("%s: warm-up generation took %.0fms", spec.name, engine.warm_up())
        weights = loaded.weights_bytes
        return ChatModel(service, engine, prompt_cache, loaded, weights + budget, settings.prompt_cache_dir is not None)

    def engine(self, spec: ModelSpec) -> tuple[GenerationEngine, KVPromptCache, LoadedModel, int]:
        """The model loaded (this rank's shard, in lockstep) and its engine, prompt cache and KV budget."""
        settings = self.settings
        started = time.perf_counter()
        if self.lockstep is not None:
            loaded = load_shard(spec.source, self.lockstep.run.group, self.lockstep.run.parallel)
        else:
            loaded = load_model(spec.source, dequantize=settings.dequantize)
        check(loaded.model, loaded.tokenizer)
        for warning in loaded.warnings:
            logger.warning("%s", warning)
        if spec.context_length is not None:
            loaded.context_length = min(loaded.context_length, spec.context_length)
        logger.info(
            "Model %s (%s) loaded in %.1fs (%s, %s weights: %s, context %d tokens) on %s",
            spec.name,
            loaded.name,
            time.perf_counter() - started,
            loaded.kind,
            "quantized" if loaded.quantized else "float32" if loaded.kind == "gguf" else "native",
            loaded.weight_format,
            loaded.context_length,
            loaded.device,
        )
        debug(2, "Model config", loaded.config)
        budget = self.kv_budget(spec)
        directory = settings.prompt_cache_dir
        if directory is not None and self.lockstep is not None:
            directory = directory / f"rank-{self.lockstep.run.rank}"  # each rank keeps its own shard's checkpoints
        prompt_cache = KVPromptCache.for_model(
            loaded.model,
            loaded.identity,
            max_entries=settings.prompt_cache_size,
            max_bytes=min(settings.prompt_cache_bytes or budget, budget),
            directory=directory,
        )
        kv_bits = spec.kv_bits or settings.kv_bits
        options = EngineOptions(settings.max_batch, settings.prefill_batch, budget, kv_bits, settings.speculative)
        engine = GenerationEngine(loaded, prompt_cache, options, self.lockstep)
        logger.info(
            "%s: batching up to %d sequences, %d prompts prefilled together; KV budget %s (%d bytes per token%s, "
            "%d tokens for one sequence); prompt cache %s",
            spec.name,
            engine.max_batch,
            min(settings.prefill_batch, engine.max_batch),
            describe_bytes(budget),
            engine.budget.bytes_per_token,
            f", {kv_bits}-bit" if kv_bits else "",
            engine.budget.max_sequence_tokens,
            (
                f"up to {prompt_cache.max_entries} entries, {describe_bytes(prompt_cache.max_bytes)}"
                if prompt_cache.enabled
                else "off"
            ),
        )
        return engine, prompt_cache, loaded, budget

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
        service = EmbeddingService(spec.name, engine)
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
