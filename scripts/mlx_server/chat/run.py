"""One chat request from the engine's events to the core's events, and the record every request leaves.

A ``ChatRun`` is built with everything it works with: the prepared chat,
the engine (stream and abort), and its ``RunRecord`` from the model's
``RunRecorder``, which owns what outlives a request (the timer's lines, the
in-flight count an unload waits for, the observers /metrics hangs on, the
answer cache, the cache-miss diagnostics).  It reaches back into nothing that
created it, and ends its record once, in one ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

from mlx_server.chat.answer_cache import AnswerCache, CachedAnswer
from mlx_server.chat.attachments import Omitted
from mlx_server.chat.call_pieces import CallAbandonedPiece, CallArgumentsPiece, CallPiece, CallStartPiece
from mlx_server.chat.diagnostics import CacheDiagnostics, MissExplanation
from mlx_server.chat.events import (
    ChatEvent,
    Completion,
    Finished,
    PromptUsage,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallAbandoned,
    ToolCallArguments,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from mlx_server.chat.failures import report_failure
from mlx_server.chat.output import OutputParser, ReasoningPiece
from mlx_server.chat.preparation import PreparedChat
from mlx_server.vocabulary import (
    CacheLookup,
    Engine,
    EngineEvent,
    GeneratedText,
    GenerationFinished,
    GenerationStats,
    InternalError,
    PromptAdmitted,
    RequestTimeoutError,
    ServerError,
)
from utils_logging import PerformanceTimer

__all__ = ["ChatRun", "RunRecord", "RunRecorder"]

logger = logging.getLogger("mlx")


class RunRecorder:
    """What one model's requests leave behind: in-flight count, observers, answers, miss explanations, log lines."""

    def __init__(self, model: str, answers: AnswerCache | None, diagnostics: CacheDiagnostics) -> None:
        self.model = model
        self.answers = answers
        self.diagnostics = diagnostics
        self._observers: list[Callable[[GenerationStats], None]] = []
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests started and not yet ended (what an unload waits for)."""
        with self._lock:
            return self._in_flight

    def observe(self, observer: Callable[[GenerationStats], None]) -> None:
        """Call ``observer(stats)`` for every completion that finishes (metrics)."""
        self._observers.append(observer)

    def begin(self, timer: PerformanceTimer) -> RunRecord:
        """A request starts (its timer started when it arrived): it counts as in flight until its record ends."""
        with self._lock:
            self._in_flight += 1
        return RunRecord(self, timer)

    def _ended(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _finished(self, stats: GenerationStats) -> None:
        for observe in self._observers:
            observe(stats)


class RunRecord:
    """One request's record: its timer's checkpoints, its answer stored, its completion line; ended once."""

    def __init__(self, recorder: RunRecorder, timer: PerformanceTimer) -> None:
        self._recorder = recorder
        self.timer = timer
        self._ended = False

    @property
    def answers(self) -> AnswerCache | None:
        return self._recorder.answers

    @property
    def diagnostics(self) -> CacheDiagnostics:
        return self._recorder.diagnostics

    def checkpoint(self, name: str) -> None:
        if name not in self.timer.checkpoints:
            self.timer.checkpoint(name)

    def finished(self, stats: GenerationStats) -> None:
        """The engine finished the request (the observers see it, whatever the dialect makes of it)."""
        self._recorder._finished(stats)

    def completed(self, completion: Completion, streamed: bool, answer_key: str | None, text: str) -> None:
        """Keep a deterministic answer, and write the completion line."""
        stats = completion.stats
        cache = self._recorder.answers
        replayable = stats.cache_source != "response" and stats.finish_reason in ("stop", "length")
        if cache is not None and answer_key is not None and replayable:
            cache.put(answer_key, CachedAnswer(text, stats.finish_reason, stats.prompt_tokens, stats.completion_tokens,
                                               stats.stop_sequence))  # fmt: skip
        _log_completion(stats, completion.finish_reason, streamed, len(completion.tool_calls), self._recorder.model)

    def end(self, failure: BaseException | None) -> None:
        """The request is over (finished, failed or cancelled): its timer stops and it leaves the in-flight count."""
        if self._ended:
            return
        self._ended = True
        self.timer.stop(failure)
        self._recorder._ended()


class ChatRun:
    """One request, from the engine's events to neutral events.

    ``begin()`` (optional) waits for the request to be admitted, so that
    failures before its first token become plain errors and the prompt's usage
    is known before a response starts; then read ``events()`` once, or
    ``complete()``.  Leaving early (a cancelled task, a closed iteration)
    stops generation.
    """

    def __init__(self, prepared: PreparedChat, engine: Engine, record: RunRecord) -> None:
        self._prepared = prepared
        self._engine = engine
        self._record = record
        self._parser = OutputParser(prepared.reasoning, prepared.tool_calling)
        self._cached = record.answers.get(prepared.answer_key) if record.answers and prepared.answer_key else None
        self._source: AsyncGenerator[EngineEvent, None] | None = None
        self._pending: asyncio.Future[EngineEvent] | None = None
        self._started: Started | None = None
        self._ended_early = False  # the reply was complete before the engine finished (``abort``)
        self._explain: Callable[[], MissExplanation] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self._prepared.prompt.tokens)

    @property
    def omitted(self) -> Omitted:
        """Attachments the prompt left out (images on a text model)."""
        return self._prepared.omitted

    @property
    def started(self) -> Started | None:
        """The admission, once ``begin()`` or ``events()`` has seen it."""
        return self._started

    def explain_miss(self) -> MissExplanation | None:
        """Where the prompt left the cache (a miss or a partial hit, once started); renders templates."""
        return self._explain() if self._explain is not None else None

    async def begin(self, wait: float | None = None) -> Started | None:
        """Wait until the engine admits the request, at most ``wait`` seconds (None: still waiting then).

        Raises the engine's refusal (``KVBudgetError``, ``GrammarError``) if it comes first.
        """
        if self._started is None:
            try:
                event = await self._next_event(wait)
                if event is not None:
                    self._admit(event)
            except BaseException as error:
                await self._close()
                self._record.end(error)
                raise
        return self._started

    async def complete(self) -> Completion:
        """The whole reply (cancel the awaiting task to stop it)."""
        completion: Completion | None = None
        async for event in self.events(streamed=False):
            if isinstance(event, Finished):
                completion = event.completion
        assert completion is not None, "events() ends with Finished or raises"
        return completion

    async def events(self, streamed: bool = True) -> AsyncGenerator[ChatEvent, None]:
        """``Started``, deltas as they are generated, then ``Finished``.

        Raises ``RequestTimeoutError`` when the request timed out and
        ``InternalError`` (after a debug file and an ERROR line) on an
        unexpected failure; the engine's refusals pass through.
        """
        failure: BaseException | None = None
        try:
            async for event in self._events(streamed):
                yield event
        except ServerError as error:
            failure = error
            raise
        except Exception as error:
            failure = error
            report_failure(error, {"stream": streamed, "prompt_tokens": self.prompt_tokens})
            raise InternalError() from error
        except BaseException as error:  # cancelled, or the iteration closed: the client went away
            failure = error
            logger.info("Chat request cancelled: the client disconnected")
            raise
        finally:
            await self._close()
            self._record.end(failure)

    # -- the engine's events -> chat events -------------------------------------------

    async def _next_event(self, wait: float | None = None) -> EngineEvent | None:
        """The engine's next event; None when ``wait`` seconds pass first (the read goes on: nothing is lost)."""
        if self._source is None:
            self._source = _replay(self._cached, self.prompt_tokens) if self._cached is not None else (
                self._engine.stream(self._prepared.generation))  # fmt: skip
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._source.__anext__())
        if wait is not None:
            done, _ = await asyncio.wait((self._pending,), timeout=wait)
            if not done:
                return None
        pending, self._pending = self._pending, None
        return await pending

    async def _close(self) -> None:
        """Stop reading the engine (closing its stream cancels the request if it still runs)."""
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):  # the read is abandoned
                await self._pending
            self._pending = None
        if self._source is not None:
            await self._source.aclose()

    def _admit(self, event: EngineEvent) -> None:
        if not isinstance(event, PromptAdmitted):
            raise AssertionError(f"the engine sent {type(event).__name__} before admitting the request")
        lookup = event.lookup
        written = 0 if lookup.source in ("off", "response") else self.prompt_tokens - lookup.cached_tokens
        usage = PromptUsage(self.prompt_tokens, lookup.cached_tokens, written)
        self._started = Started(usage, lookup, self._prepared.echo)
        if lookup.source != "response":
            self._record_lookup(lookup)

    def _record_lookup(self, lookup: CacheLookup) -> None:
        prompt, diagnostics = self._prepared.prompt, self._record.diagnostics
        self._explain = diagnostics.explainer(lookup, prompt.messages, prompt.tools, prompt.options)
        if lookup.source != "off":
            diagnostics.record(lookup, prompt.tokens, self._explain)

    async def _events(self, streamed: bool) -> AsyncGenerator[ChatEvent, None]:
        while self._started is None:
            event = await self._next_event()
            assert event is not None
            self._admit(event)
        yield self._started
        text_parts: list[str] = []
        reasoning_parts: list[str] = []
        content_parts: list[str] = []
        stats: GenerationStats | None = None
        while stats is None:
            event = await self._next_event()
            if isinstance(event, GenerationFinished):
                stats = event.stats
            elif isinstance(event, GeneratedText):
                self._record.checkpoint("prompt_processed")
                text_parts.append(event.text)
                for delta in self._deltas(self._parser.feed(event.text), reasoning_parts, content_parts):
                    yield delta
                if self._parser.repeated_a_call and not self._ended_early:
                    self._ended_early = True  # a forced call started over: the reply is complete
                    self._engine.abort(self._prepared.generation.request_id)
        self._record.finished(stats)
        if stats.finish_reason == "timeout":
            error = RequestTimeoutError(stats.completion_tokens)
            logger.warning("Chat request stopped: %s", error.message)
            raise error
        for delta in self._deltas(self._parser.finish(), reasoning_parts, content_parts):
            yield delta
        self._record.checkpoint("inference_complete")
        calls = list(self._parser.calls)
        ended = "stop" if self._ended_early else stats.finish_reason  # the length it ran to before the abort is moot
        finish_reason = "tool_calls" if calls and ended == "stop" else ended
        completion = Completion(
            text="".join(content_parts),
            reasoning="".join(reasoning_parts),
            tool_calls=calls,
            stats=stats,
            finish_reason=finish_reason,
            usage=Usage(self._started.usage, stats.completion_tokens),
            stop_sequence=stats.stop_sequence,
            echo=self._prepared.echo,
        )
        self._record.completed(completion, streamed, self._prepared.answer_key, "".join(text_parts))
        yield Finished(completion)

    def _deltas(self, pieces: list[Any], reasoning: list[str], content: list[str]) -> list[ChatEvent]:
        deltas: list[ChatEvent] = []
        for piece in pieces:
            if isinstance(piece, ReasoningPiece):
                reasoning.append(piece.text)
                deltas.append(ReasoningDelta(piece.text))
            elif isinstance(piece, CallPiece):
                deltas.append(ToolCallDelta(piece.index, piece.call, piece.streamed))
            elif isinstance(piece, CallStartPiece):
                deltas.append(ToolCallStart(piece.index, piece.id, piece.name))
            elif isinstance(piece, CallArgumentsPiece):
                deltas.append(ToolCallArguments(piece.index, piece.text))
            elif isinstance(piece, CallAbandonedPiece):
                deltas.append(ToolCallAbandoned(piece.index))
            elif piece.text:
                content.append(piece.text)
                deltas.append(TextDelta(piece.text))
        return deltas


async def _replay(cached: CachedAnswer, prompt_tokens: int) -> AsyncGenerator[EngineEvent, None]:
    """A cached answer, delivered like a generation: admitted with every prompt token cached, its text, its stats."""
    yield PromptAdmitted(CacheLookup(prompt_tokens, "response"))
    yield GeneratedText(cached.text)
    stats = GenerationStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=cached.completion_tokens,
        cached_tokens=prompt_tokens,
        cache_source="response",
        finish_reason=cached.finish_reason,
        stop_sequence=cached.stop_sequence,
    )
    yield GenerationFinished(stats)


def _log_completion(stats: GenerationStats, finish_reason: str, streamed: bool, tool_calls: int, model: str) -> None:
    if stats.finish_reason == "cancelled":
        logger.info("Chat request cancelled: the client disconnected after %d tokens", stats.completion_tokens)
        return
    logger.info(
        "Chat request completed successfully: %d prompt tokens (%d cached), %d completion tokens, finish_reason=%s, "
        "queue %.0fms, time to first token %.0fms, %.1f tokens/s%s",
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.completion_tokens,
        finish_reason,
        stats.queue_ms,
        stats.time_to_first_token_ms,
        stats.tokens_per_second,
        (f", {tool_calls} tool call{'s' if tool_calls != 1 else ''}" if tool_calls else "")
        + (
            f", speculative: {stats.accepted_tokens} of {stats.drafted_tokens} drafted tokens kept"
            if stats.drafted_tokens
            else ""
        )
        + (", streamed" if streamed else "")
        + f", model {model}",
    )
