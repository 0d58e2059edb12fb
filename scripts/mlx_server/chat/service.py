"""One model's chat service: the dialects' way to a model, from a ``ChatRequest`` to a running ``ChatRun``.

``start`` prepares the request off the event loop (``preparation``: its
attachments read within their limits, the prompt rendered and tokenized, the
output rules and sampling decided), within the request's time limit, and
returns the ``ChatRun`` that answers it (``run``), built with the engine and
a record of its own.  Everything the edge shows of a model comes from
``report`` and ``cache_entries``; metrics hang on ``observe_completions`` and
``observe_steps``.  The engine is reached through ``vocabulary.Engine`` only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from mlx_server.chat.answer_cache import AnswerCache, AnswerCacheStats
from mlx_server.chat.diagnostics import CacheDiagnostics
from mlx_server.chat.preparation import PreparedChat, ServiceOptions, default_sampling, prepare_chat, render
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.request import ChatRequest
from mlx_server.chat.run import ChatRun, RunRecorder
from mlx_server.vocabulary import (
    Engine,
    EngineStats,
    GenerationStats,
    Message,
    PromptCacheStats,
    RequestTimeoutError,
    Sampling,
)
from utils_logging import PerformanceTimer, debug, get_request_id

__all__ = ["ChatRun", "ChatService", "ModelReport", "ServiceOptions", "off_the_event_loop"]

logger = logging.getLogger("mlx")
Result = TypeVar("Result")

#: Requests prepared at once (rendering, tokenizing, reading attachments), across every model.
PREPARING_THREADS = 4
_preparing: ThreadPoolExecutor | None = None
_preparing_lock = threading.Lock()


async def off_the_event_loop(work: Callable[[], Result], timeout: float | None = None) -> Result:
    """``work()`` on the preparation threads (its log lines keep the request's id); RequestTimeoutError past
    ``timeout`` seconds (the work is bounded by its own limits and finishes unread)."""
    global _preparing
    with _preparing_lock:
        if _preparing is None:
            _preparing = ThreadPoolExecutor(PREPARING_THREADS, thread_name_prefix="mlx-prepare")
        executor = _preparing
    context = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(executor, context.run, work)
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(0) from None


@dataclass(frozen=True)
class ModelReport:
    """What /health, /metrics and /v1/cache show of a chat model."""

    name: str
    info: dict[str, Any]
    engine: EngineStats
    prompt_cache: PromptCacheStats
    answers: AnswerCacheStats | None
    failure: str | None = None  # why the model can no longer generate


class ChatService:
    """Answers ``ChatRequest`` values with one model's engine; shared by every dialect.

    ``profile`` is the model's facts, worked out once (from the engine's
    tokenizer and context when not given).
    """

    def __init__(
        self,
        engine: Engine,
        options: ServiceOptions,
        answers: AnswerCache | None = None,
        profile: ModelProfile | None = None,
        name: str = "model",
    ) -> None:
        self.engine = engine
        self.options = options
        self.answers = answers
        self.name = name
        self.profile = profile or ModelProfile(engine.tokenizer, engine.context_length)
        self.diagnostics = CacheDiagnostics(self.profile.template)
        self._recorder = RunRecorder(name, answers, self.diagnostics)

    @property
    def in_flight(self) -> int:
        """Requests started (``start``) whose run has not ended yet."""
        return self._recorder.in_flight

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        """The longest a prompt and its completion may be: the model's context, or less under the KV budget."""
        return self.engine.context_length

    @property
    def default_sampling(self) -> Sampling:
        """What a request that sets nothing samples with (see ``preparation.default_sampling``)."""
        return default_sampling(self.profile, self.options)

    # -- what the edge reads and hangs on ---------------------------------------------------------------

    def report(self) -> ModelReport:
        """The model's figures: its description, its batch, its prompt cache, its answer cache."""
        engine = self.engine
        answers = self.answers.stats() if self.answers else None
        return ModelReport(self.name, engine.model_info, engine.stats(), engine.cache_stats(), answers, engine.failure)

    def cache_entries(self) -> list[dict[str, Any]]:
        """The prompt cache's entries, described (for /v1/cache)."""
        return self.engine.cache_entries()

    def recent_misses(self) -> list[dict[str, Any]]:
        """The last cache misses explained (template renders: call it off the event loop)."""
        return self.diagnostics.recent_misses()

    def observe_completions(self, observer: Callable[[GenerationStats], None]) -> None:
        """Call ``observer(stats)`` for every completion that finishes."""
        self._recorder.observe(observer)

    def observe_steps(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(batch size)`` after every decode step (from the engine's thread)."""
        self.engine.observe_steps(observer)

    def count_arrivals(self, in_flight: Callable[[], int]) -> None:
        """Let the engine read how many requests the server has accepted (to start a lone one at once)."""
        self.engine.count_arrivals(in_flight)

    # -- requests ---------------------------------------------------------------------------------------

    async def start(self, request: ChatRequest, trace: Callable[[], Any] | None = None) -> ChatRun:
        """Prepare a request (a ``ServerError`` on bad input) and return its run; nothing runs until it is read.

        ``trace`` returns the request as received, logged (redacted) at ANYCLAUDE_DEBUG=3.
        """
        timer = PerformanceTimer("chat_completion").start()
        try:
            logger.info("Processing chat request")
            if trace is not None:
                debug(3, "Chat request", trace)
            timer.checkpoint("request_parsed")
            prepared = await self._prepared(request)
            timer.checkpoint("cache_check")
        except BaseException as error:
            timer.stop(error)
            raise
        return ChatRun(prepared, self.engine, self._recorder.begin(timer))

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        """Exactly the prompt tokens ``start`` would use for the same request (prepared off the event loop)."""
        options, context = self.options, self.context_length
        prompt, _ = await off_the_event_loop(
            lambda: render(request, self.profile, options, context), options.request_timeout or None
        )
        return len(prompt.tokens)

    def warm(self, system_prompt: str) -> int:
        """Prefill ``system_prompt`` (rendered as a conversation's system message) and keep it as a checkpoint.

        Returns the checkpoint's length in tokens; 0 when the template does not
        render the system prompt apart from the rest.
        """
        messages = [Message("system", system_prompt), Message("user", "")]
        prompt, prefix = self.profile.template.tokens_with_prefix(messages)
        if prefix:
            self.engine.prefill_checkpoint(prompt[:prefix])
        return prefix

    def sampling_line(self) -> str:
        """The sampling defaults in force and where each came from, for the start-up line."""
        layers = [
            (self.options.default_sampling, "--default-{}"),
            (self.profile.configured, "--models-config"),
            (self.profile.recommended.sampling, self.profile.recommended.source),
        ]
        parts: list[str] = []
        seen: set[str] = set()
        for sampling, source in layers:
            for name, value in sampling.given().items():
                if name not in seen:
                    seen.add(name)
                    parts.append(f"{name} {value:g} ({source.format(name.replace('_', '-'))})")
        plain = "otherwise plain (temperature 1, no filters or penalties)"
        return f"Sampling for {self.name} when a request sets none: " + ", ".join([*parts, plain])

    async def _prepared(self, request: ChatRequest) -> PreparedChat:
        request_id = get_request_id() or f"req_{secrets.token_hex(8)}"
        work = functools.partial(
            prepare_chat, request, self.profile, self.options, self.context_length, request_id, self.answers
        )
        return await off_the_event_loop(work, self.options.request_timeout or None)
