"""One model assembled: its prompt cache, engine, profile and service, wired in one place.

The pool's loader, every rank of a distributed model and the test bed build
a chat model here, from a loaded model and the server's settings, so there is
one way a model is put together.  What each loaded model takes from the one
memory budget is its weights and, for a chat model, its KV budget (the batch
and the prompt cache never hold more).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mlx_server.chat.answer_cache import AnswerCache
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.service import ChatService
from mlx_server.embeddings.service import EmbeddingService
from mlx_server.engine.embedding import EmbeddingEngine
from mlx_server.engine.generation import EngineOptions, GenerationEngine
from mlx_server.engine.lockstep import Lockstep
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.model.loading import LoadedModel
from mlx_server.model.vision import VisionTower
from mlx_server.pool.options import service_options
from mlx_server.pool.registry import ModelSpec
from mlx_server.settings import Settings

__all__ = ["ChatModel", "EmbeddingModel", "assemble_chat"]

logger = logging.getLogger("mlx")


@dataclass
class ChatModel:
    """A loaded chat model: its service and what serves it (a ``pool.Served``)."""

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
    """A loaded embedding model: its service and its engine (a ``pool.Served``)."""

    service: EmbeddingService
    engine: EmbeddingEngine
    memory_bytes: int

    def busy(self) -> bool:
        return self.service.busy()

    def close(self, drain_seconds: float) -> None:
        self.engine.shutdown(drain_seconds)


def assemble_chat(
    loaded: LoadedModel,
    spec: ModelSpec,
    settings: Settings,
    kv_budget: int,
    lockstep: Lockstep | None = None,
    cache_directory: Path | None = None,
) -> ChatModel:
    """The prompt cache, engine (its worker started), profile and service of a loaded chat model.

    ``cache_directory`` holds the prompt cache's checkpoints (None: they are not saved).
    """
    if spec.context_length is not None:
        loaded.context_length = min(loaded.context_length, spec.context_length)
    prompt_cache = KVPromptCache.for_model(
        loaded.model,
        loaded.identity,
        max_entries=settings.prompt_cache_size,
        max_bytes=min(settings.prompt_cache_bytes or kv_budget, kv_budget),
        directory=cache_directory,
    )
    kv_bits = spec.kv_bits or settings.kv_bits
    options = EngineOptions(settings.max_batch, settings.prefill_batch, kv_budget, kv_bits, settings.speculative)
    engine = GenerationEngine(loaded, prompt_cache, options, lockstep)
    recommended = loaded.recommended_sampling if settings.generation_config == "auto" else None
    images = images_read(loaded.vision, kv_bits)
    if images is None and loaded.vision is not None:
        logger.warning(
            "%s reads no images with --kv-bits: its images take M-RoPE's per-row positions, which the quantized "
            "cache (one sequence at a time) does not keep; images are left out",
            spec.name,
        )
    profile = ModelProfile(loaded.tokenizer, engine.context_length, recommended, spec.sampling, images)
    answers = AnswerCache(loaded.identity, settings.response_cache_size)
    service = ChatService(engine, service_options(settings), answers, profile=profile, name=spec.name)
    memory = loaded.weights_bytes + kv_budget
    return ChatModel(service, engine, prompt_cache, loaded, memory, cache_directory is not None)


def images_read(vision: VisionTower | None, kv_bits: int | None) -> VisionTower | None:
    """What reads the model's images: none for an M-RoPE model with a quantized KV cache (``--kv-bits`` decodes
    one sequence at a time through mlx-lm's ``stream_generate``, whose cache keeps no per-row position delta)."""
    if vision is not None and vision.positions_on_grid and kv_bits:
        return None
    return vision
