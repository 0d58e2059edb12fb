"""The protocol-neutral chat core: one owner of a request from messages to events.

``ChatService.start`` renders the prompt (billing line removed, tools in the
template), decides the output rules (grammar, tool calls, reasoning), fills in
the sampling settings under the dialect's length policy and looks up the
response cache.  The ``ChatRun`` it returns owns everything else: the engine
stream, parsing the output into reasoning, content and calls, timing, metrics,
storing a deterministic answer, and the two log lines the integration guide
shows.  Dialects only translate a ``ChatRequest`` in and ``ChatEvent`` values out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from mlx_server.chat.events import (
    ChatEvent,
    Completion,
    Finished,
    Keepalive,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from mlx_server.chat.output import OutputParser, ReasoningPiece, reasoning_syntax
from mlx_server.chat.request import ChatRequest, Message, Tool
from mlx_server.errors import APIError, ContextOverflowError, report_failure
from mlx_server.generation import GenerationEngine, GenerationStats, KVBudgetError, SamplingSettings, TokenEvent
from mlx_server.grammar import GrammarError, OutputConstraint, build_grammar
from mlx_server.prompts import (
    fill_in_the_middle,
    message_at_token,
    normalize_billing_header,
    render_prompt_with_prefix,
)
from mlx_server.response_cache import CachedResponse, ResponseCache
from mlx_server.tool_parsing import HERMES, CallPiece, ToolCallFormat, ToolCalling, detect_tool_call_format
from mlx_server.tool_prompts import template_tool_support
from utils_logging import PerformanceTimer, debug

__all__ = ["ChatRun", "ChatService", "ServiceOptions"]

logger = logging.getLogger("mlx")


@dataclass(frozen=True)
class ServiceOptions:
    """The server settings the core reads."""

    default_max_tokens: int = 1024
    default_temperature: float = 1.0  # for requests that set none
    default_repetition_penalty: float | None = None  # for requests that set none
    keep_billing_header: bool = False
    request_timeout: float = 0.0  # 0: none
    keepalive_interval: float = 0.0  # 0: none


@dataclass(frozen=True)
class _Prepared:
    prompt: list[int]
    stable_prefix: int
    messages: tuple[Message, ...] = ()  # as rendered (billing line removed)
    tools: tuple[Tool, ...] = ()


class ChatService:
    """Answers ``ChatRequest`` values with the engine; shared by every dialect."""

    def __init__(
        self,
        engine: GenerationEngine,
        options: ServiceOptions,
        response_cache: ResponseCache | None = None,
        observe: Callable[[GenerationStats], None] = lambda _stats: None,
    ) -> None:
        self.engine = engine
        self.options = options
        self.response_cache = response_cache
        self.observe = observe

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        """The longest a prompt and its completion may be: the model's context, or less under the KV budget."""
        return self.engine.max_sequence_tokens

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        """Exactly the prompt tokens ``start`` would use for the same request."""
        return len(self._render(request).prompt)

    def start(self, request: ChatRequest, trace: Callable[[], Any] | None = None) -> ChatRun:
        """Validate and prepare a request (APIError on bad input); nothing runs until its events are read.

        ``trace`` returns the request as received, logged (redacted) at ANYCLAUDE_DEBUG=3.
        """
        timer = PerformanceTimer("chat_completion").start()
        try:
            logger.info("Processing chat request")
            if trace is not None:
                debug(3, "Chat request", trace)
            timer.checkpoint("request_parsed")
            prepared = self._render(request)
            grammar, tool_calling = self._output_rules(request)
            settings = self._sampling_settings(request, len(prepared.prompt), grammar)
            answer_key, cached = self._look_up_answer(prepared.prompt, settings)
            timer.checkpoint("cache_check")
            debug(
                2,
                "Generation settings",
                lambda: {
                    "prompt_tokens": len(prepared.prompt),
                    "stable_prefix": prepared.stable_prefix,
                    "tool_calls": "off" if tool_calling is None else tool_calling.call_format.name,
                    **settings.__dict__,
                    "grammar": "none" if grammar is None else f"{len(grammar)} characters",
                },
            )
        except BaseException as error:
            timer.stop(error)
            raise
        parser = OutputParser(reasoning_syntax(self.tokenizer, prepared.prompt), tool_calling)
        return ChatRun(self, prepared, settings, parser, timer, answer_key, cached)

    # -- preparing ------------------------------------------------------------

    def _render(self, request: ChatRequest) -> _Prepared:
        if request.prompt is not None:
            prompt = self._raw_prompt(request)
            if not prompt:
                raise APIError(400, "the prompt is empty: send at least one token of text", param="prompt")
            return _Prepared(prompt, 0)
        messages: list[Message] = list(request.messages)
        if not self.options.keep_billing_header:
            messages, removed = normalize_billing_header(messages)
            if removed:
                debug(2, "Normalized the volatile billing-header line", {"lines_removed": removed})
        prompt, stable_prefix = render_prompt_with_prefix(self.tokenizer, messages, request.tools)
        return _Prepared(prompt, stable_prefix, tuple(messages), request.tools)

    def _raw_prompt(self, request: ChatRequest) -> list[int]:
        """The legacy completions prompt: token ids as given, or text (with a suffix: fill-in-the-middle)."""
        if isinstance(request.prompt, tuple):
            vocabulary = len(self.tokenizer.get_vocab())
            if any(token >= vocabulary for token in request.prompt):
                raise APIError(400, f"token ids must be below the vocabulary size ({vocabulary})", param="prompt")
            return list(request.prompt)
        text = request.prompt or ""
        if request.suffix is not None:
            text = fill_in_the_middle(self.tokenizer, text, request.suffix)
        return [int(token) for token in self.tokenizer.encode(text)]

    def _output_rules(self, request: ChatRequest) -> tuple[str | None, ToolCalling | None]:
        """The grammar the output must follow (None: free) and how to find tool calls in it (None: do not look)."""
        mode = request.tool_mode
        call_format = HERMES
        if request.tools and template_tool_support(self.tokenizer).tools:
            call_format = detect_tool_call_format(self.tokenizer)
        markers = _call_marker_stems(call_format) if request.tools and mode == "none" else ()
        constraint = OutputConstraint(
            tools=request.tools,
            tool_mode=mode,
            forced_function=request.tool_choice.name,
            parallel_calls=request.parallel_tool_calls,
            json_schema=request.json_schema,
            forbidden_markers=tuple(marker for marker in markers if marker),
        )
        try:
            grammar = build_grammar(constraint, request.tool_params, request.schema_param)
            if grammar is not None:
                self.engine.check_grammar_support()
        except GrammarError as error:
            raise APIError(400, str(error), param=error.param, code="invalid_schema") from error
        if not request.tools:
            return grammar, None
        tools = tuple((tool.name, tool.kind) for tool in request.tools)
        return grammar, ToolCalling(call_format, tools, request.parallel_tool_calls, emit=mode != "none")

    def _sampling_settings(self, request: ChatRequest, prompt_length: int, grammar: str | None) -> SamplingSettings:
        """Lengths checked against the context under the dialect's policy, defaults filled in."""
        context = self.context_length
        room = context - prompt_length
        requested = request.max_tokens
        if room < 1:
            raise ContextOverflowError(context, prompt_length, requested, "messages")
        if requested is not None and requested > room:
            if request.length_policy == "reject":
                raise ContextOverflowError(context, prompt_length, requested, request.length_param)
            requested = room  # Anthropic's max_tokens is a ceiling: generate until it or the context is full
        sampling = request.sampling
        return SamplingSettings(
            max_tokens=requested if requested is not None else min(self.options.default_max_tokens, room),
            temperature=self.options.default_temperature if sampling.temperature is None else sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repetition_penalty=(
                self.options.default_repetition_penalty
                if sampling.repetition_penalty is None
                else sampling.repetition_penalty
            ),
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            seed=sampling.seed,
            stop=sampling.stop,
            grammar=grammar,
        )

    def _look_up_answer(
        self, prompt: list[int], settings: SamplingSettings
    ) -> tuple[str | None, CachedResponse | None]:
        """Deterministic requests (greedy, or seeded) may be answered from the response cache.

        The key is the rendered prompt (messages, tools and template together) and every sampling setting.
        """
        cache = self.response_cache
        if cache is None or not cache.max_entries or (settings.temperature > 0 and settings.seed is None):
            return None, None
        key = cache.key_for({"prompt": prompt, **settings.__dict__})
        return key, cache.get(key)


class ChatRun:
    """One request, from the engine's tokens to neutral events; read ``events()`` once, or ``complete()``."""

    def __init__(
        self,
        service: ChatService,
        prepared: _Prepared,
        settings: SamplingSettings,
        parser: OutputParser,
        timer: PerformanceTimer,
        answer_key: str | None,
        cached: CachedResponse | None,
    ) -> None:
        self._service = service
        self._prepared = prepared
        self._settings = settings
        self._parser = parser
        self._timer = timer
        self._answer_key = answer_key
        self._cached = cached
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self._prepared.prompt)

    async def complete(self, request: Request) -> Completion:
        """The whole reply; stops generating if the client disconnects first."""
        watcher = asyncio.create_task(_cancel_when_disconnected(request, self._cancelled))
        completion: Completion | None = None
        try:
            async for event in self.events(streamed=False):
                if isinstance(event, Finished):
                    completion = event.completion
        finally:
            watcher.cancel()
        assert completion is not None, "events() ends with Finished or raises"
        return completion

    async def events(self, streamed: bool = True) -> AsyncIterator[ChatEvent]:
        """Deltas as they are generated, keep-alives when silent, then ``Finished``.

        Raises APIError 504 when the request timed out, and APIError 500
        (after a debug file and an ERROR line) on an unexpected failure.
        Leaving early (a client that went away) stops generation.
        """
        failure: BaseException | None = None
        try:
            async for event in self._events(streamed):
                yield event
        except (asyncio.CancelledError, GeneratorExit) as error:
            failure = error
            logger.info("Chat request cancelled: the client disconnected")
            raise
        except APIError as error:
            failure = error
            raise
        except KVBudgetError as error:
            failure = error
            raise APIError(400, str(error), param="max_tokens", code="kv_budget_exceeded") from error
        except Exception as error:
            failure = error
            report_failure(error, {"stream": streamed, "prompt_tokens": self.prompt_tokens})
            message = "the server hit an internal error"
            raise APIError(500, message, error_type="server_error", code="internal_error") from error
        finally:
            self._cancelled.set()
            self._timer.stop(failure)

    async def _events(self, streamed: bool) -> AsyncIterator[ChatEvent]:
        text_parts: list[str] = []
        reasoning_parts: list[str] = []
        content_parts: list[str] = []
        stats: GenerationStats | None = None
        async for event in self._token_events():
            if event is None:
                yield Keepalive()
                continue
            if "prompt_processed" not in self._timer.checkpoints:
                self._timer.checkpoint("prompt_processed")
            stats = event.stats or stats
            if event.text:
                text_parts.append(event.text)
                for delta in self._deltas(self._parser.feed(event.text), reasoning_parts, content_parts):
                    yield delta
        assert stats is not None
        self._service.observe(stats)
        if stats.finish_reason == "timeout":
            raise _timed_out(stats)
        for delta in self._deltas(self._parser.finish(), reasoning_parts, content_parts):
            yield delta
        self._timer.checkpoint("inference_complete")
        calls = list(self._parser.calls)
        finish_reason = "tool_calls" if calls and stats.finish_reason == "stop" else stats.finish_reason
        self._remember("".join(text_parts), stats)
        _log_completion(stats, finish_reason, streamed, len(calls))
        written = 0 if stats.cache_source in ("off", "response") else stats.prompt_tokens - stats.cached_tokens
        completion = Completion(
            text="".join(content_parts),
            reasoning="".join(reasoning_parts),
            tool_calls=calls,
            stats=stats,
            finish_reason=finish_reason,
            stop_sequence=stats.stop_sequence,
            cache_written_tokens=written,
        )
        yield Finished(completion)

    def _deltas(self, pieces: list[Any], reasoning: list[str], content: list[str]) -> list[ChatEvent]:
        deltas: list[ChatEvent] = []
        for piece in pieces:
            if isinstance(piece, ReasoningPiece):
                reasoning.append(piece.text)
                deltas.append(ReasoningDelta(piece.text))
            elif isinstance(piece, CallPiece):
                deltas.append(ToolCallDelta(self._parser.calls.index(piece.call), piece.call))
            elif piece.text:
                content.append(piece.text)
                deltas.append(TextDelta(piece.text))
        return deltas

    def _token_events(self) -> AsyncIterator[TokenEvent | None]:
        if self._cached is not None:
            return _replay(self._cached, self.prompt_tokens)
        options, prepared = self._service.options, self._prepared
        return self._service.engine.stream(
            prepared.prompt,
            self._settings,
            self._cancelled,
            prepared.stable_prefix,
            timeout=options.request_timeout or None,
            keepalive=options.keepalive_interval,
            locate=self._locate if prepared.messages else None,
        )

    def _locate(self, offset: int) -> tuple[int, str] | None:
        prepared = self._prepared
        return message_at_token(self._service.tokenizer, prepared.messages, prepared.tools, offset)

    def _remember(self, text: str, stats: GenerationStats) -> None:
        cache = self._service.response_cache
        if cache is None or self._answer_key is None or self._cached is not None:
            return
        if stats.finish_reason in ("stop", "length"):
            cached = CachedResponse(
                text, stats.finish_reason, stats.prompt_tokens, stats.completion_tokens, stats.stop_sequence
            )
            cache.put(self._answer_key, cached)


def _call_marker_stems(call_format: ToolCallFormat) -> tuple[str, ...]:
    """What may not appear under tool_choice none: each call marker without its closing ``>``.

    ``<tool_call`` rather than ``<tool_call>``: a model kept from the marker
    otherwise writes look-alikes such as ``<tool_call_local>``.
    """
    markers = [call_format.start, call_format.end, HERMES.start, HERMES.end]
    stems = [marker.removesuffix(">") for marker in markers if len(marker.removesuffix(">")) > 1]
    return tuple(dict.fromkeys(stems))


async def _replay(cached: CachedResponse, prompt_tokens: int) -> AsyncIterator[TokenEvent | None]:
    """A cached answer, delivered like a generation: its text, then its stats (all prompt tokens cached)."""
    yield TokenEvent(cached.text)
    stats = GenerationStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=cached.completion_tokens,
        cached_tokens=prompt_tokens,
        cache_source="response",
        finish_reason=cached.finish_reason,
        stop_sequence=cached.stop_sequence,
    )
    yield TokenEvent("", stats=stats)


async def _cancel_when_disconnected(request: Request, cancelled: threading.Event) -> None:
    """Set ``cancelled`` when the client goes away (the body is already read, so the next message says so)."""
    while not cancelled.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancelled.set()


def _timed_out(stats: GenerationStats) -> APIError:
    error = APIError(
        504,
        f"the request ran past the server's --request-timeout and was stopped after {stats.completion_tokens} "
        "generated tokens; raise the timeout or lower max_tokens",
        error_type="server_error",
        code="request_timeout",
    )
    logger.warning("Chat request stopped: %s", error.message)
    return error


def _log_completion(stats: GenerationStats, finish_reason: str, streamed: bool, tool_calls: int) -> None:
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
        + (", streamed" if streamed else ""),
    )
