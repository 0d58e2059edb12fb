"""The protocol-neutral chat core: one owner of a request from messages to events.

``ChatService.start`` renders the prompt (billing line removed, tools in the
template), decides the output rules (grammar, tool calls, reasoning), fills in
the sampling settings under the length policy and looks up the answer cache.
The ``ChatRun`` it returns owns everything else: the engine's stream, parsing
the output into reasoning, content and calls, timing, metrics, storing a
deterministic answer, explaining a cache miss, and the two log lines the
integration guide shows.  Dialects only translate a ``ChatRequest`` in and
``ChatEvent`` values out; the engine is reached through ``vocabulary.Engine``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from mlx_server.chat.answer_cache import AnswerCache, CachedAnswer
from mlx_server.chat.attachments import NOTHING_OMITTED, Omitted, prepare
from mlx_server.chat.call_formats import HERMES, ToolCallFormat
from mlx_server.chat.diagnostics import CacheDiagnostics, MissExplanation
from mlx_server.chat.events import (
    ChatEvent,
    Completion,
    Finished,
    Keepalive,
    PromptUsage,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from mlx_server.chat.failures import report_failure
from mlx_server.chat.grammars import OutputConstraint, ReasoningMarkers, build_grammar
from mlx_server.chat.image_prompts import expanding, locate_images
from mlx_server.chat.output import HARMONY_REASONING, OutputParser, ReasoningPiece, ReasoningSyntax, reasoning_syntax
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.prompts import RenderedPrompt, fill_in_the_middle, normalize_billing_header
from mlx_server.chat.request import ChatRequest
from mlx_server.chat.tool_parsing import CallPiece, ToolCalling
from mlx_server.chat.tool_prompts import template_tool
from mlx_server.vocabulary import (
    PLAIN_SAMPLING,
    CacheLookup,
    ContextOverflowError,
    Engine,
    EngineEvent,
    GeneratedText,
    GenerationFinished,
    GenerationRequest,
    GenerationStats,
    InternalError,
    InvalidRequestError,
    KeepAlive,
    Message,
    PromptAdmitted,
    RequestTimeoutError,
    Sampling,
    ServerError,
)
from utils_logging import PerformanceTimer, debug

THINKING_SHARE_BEFORE_A_FORCED_ANSWER = 0.5  # of max_tokens: the rest is room for the call or JSON

__all__ = ["ChatRun", "ChatService", "ServiceOptions"]

logger = logging.getLogger("mlx")


@dataclass(frozen=True)
class ServiceOptions:
    """The server settings the core reads (their defaults live in ``settings``).

    ``default_sampling`` is the server's ``--default-*`` options: it fills
    what a request leaves unset, before the model's own recommendation.
    """

    default_max_tokens: int
    default_sampling: Sampling
    keep_billing_header: bool
    request_timeout: float  # 0: none
    keepalive_interval: float  # 0: none
    strict_max_tokens: bool = False  # OpenAI's 400 for a completion limit past the context, instead of a cap


class ChatService:
    """Answers ``ChatRequest`` values with one model's engine; shared by every dialect.

    ``profile`` is the model's facts, worked out once (from the engine's
    tokenizer and context when not given); ``observers`` see each finished
    completion's stats (the metrics).
    """

    def __init__(
        self,
        engine: Engine,
        options: ServiceOptions,
        answers: AnswerCache | None = None,
        observe: Callable[[GenerationStats], None] | None = None,
        profile: ModelProfile | None = None,
        name: str = "model",
    ) -> None:
        self.engine = engine
        self.options = options
        self.answers = answers
        self.name = name
        self.observers: list[Callable[[GenerationStats], None]] = [observe] if observe is not None else []
        self.profile = profile or ModelProfile(engine.tokenizer, engine.context_length)
        self.diagnostics = CacheDiagnostics(self.profile.template)
        self._runs = 0  # started and not yet ended: what an unload waits for
        self._runs_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests started (``start``) whose run has not ended yet."""
        with self._runs_lock:
            return self._runs

    def _run_started(self) -> Callable[[], None]:
        """Count a run; returns its end, which counts only once however often it is called."""
        with self._runs_lock:
            self._runs += 1
        ended = threading.Event()

        def end() -> None:
            if not ended.is_set():
                ended.set()
                with self._runs_lock:
                    self._runs -= 1

        return end

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        """The longest a prompt and its completion may be: the model's context, or less under the KV budget."""
        return self.engine.context_length

    @property
    def default_sampling(self) -> Sampling:
        """What a request that sets nothing samples with: the server's options, the models config's for this
        model, the model's own recommendation, then plain sampling."""
        profile = self.profile
        return (
            self.options.default_sampling.over(profile.configured)
            .over(profile.recommended.sampling)
            .over(PLAIN_SAMPLING)
        )

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

    def count_prompt_tokens(self, request: ChatRequest) -> int:
        """Exactly the prompt tokens ``start`` would use for the same request."""
        return len(self._render(request)[0].tokens)

    def start(self, request: ChatRequest, trace: Callable[[], Any] | None = None) -> ChatRun:
        """Validate and prepare a request (a ``ServerError`` on bad input); nothing runs until it is read.

        ``trace`` returns the request as received, logged (redacted) at ANYCLAUDE_DEBUG=3.
        """
        timer = PerformanceTimer("chat_completion").start()
        try:
            logger.info("Processing chat request")
            if trace is not None:
                debug(3, "Chat request", trace)
            timer.checkpoint("request_parsed")
            prompt, omitted = self._render(request)
            if omitted:
                debug(1, "Left out attachments this model cannot read", {"left_out": omitted.describe()})
            if prompt.images:
                image_tokens = sum(image.length for image in prompt.images)
                debug(1, "Images in the prompt", {"images": len(prompt.images), "image_tokens": image_tokens})
            reasoning = reasoning_syntax(self.tokenizer, prompt.tokens, self.profile.harmony)
            max_tokens = self._max_tokens(request, len(prompt.tokens))
            grammar, tool_calling = self._output_rules(request, reasoning, max_tokens)
            sampling = self._sampling(request)
            answer_key, cached = self._look_up_answer(prompt, max_tokens, sampling, grammar)
            timer.checkpoint("cache_check")
            debug(
                2,
                "Generation settings",
                lambda: {
                    "prompt_tokens": len(prompt.tokens),
                    "stable_prefix": prompt.stable_prefix,
                    "tool_calls": "off" if tool_calling is None else tool_calling.call_format.name,
                    "max_tokens": max_tokens,
                    **sampling.given(),
                    "grammar": "none" if grammar is None else f"{len(grammar)} characters",
                },
            )
        except BaseException as error:
            timer.stop(error)
            raise
        parser = OutputParser(reasoning, tool_calling)
        generation = GenerationRequest(
            prompt.tokens,
            max_tokens,
            sampling,
            grammar,
            stable_prefix=prompt.stable_prefix,
            turn_start=prompt.turn_start,
            after_user=prompt.after_user,
            lane=request.lane,
            timeout=self.options.request_timeout or None,
            keepalive=self.options.keepalive_interval,
            images=prompt.images,
        )
        return ChatRun(self, prompt, generation, parser, timer, answer_key, cached, self._run_started(), omitted)

    def recent_misses(self) -> list[dict[str, Any]]:
        """The last cache misses explained (template renders: call it off the event loop)."""
        return self.diagnostics.recent_misses()

    # -- preparing ------------------------------------------------------------

    def _render(self, request: ChatRequest) -> tuple[RenderedPrompt, Omitted]:
        """The prompt, and what it left out of the messages' attachments (images on a text model)."""
        if request.prompt is not None:
            tokens = self._raw_prompt(request)
            if not tokens:
                raise InvalidRequestError("the prompt is empty: send at least one token of text", "prompt")
            return RenderedPrompt(tokens), NOTHING_OMITTED
        reader = self.profile.images
        messages, omitted, images = prepare(request.messages, reader.marker if reader is not None else None)
        if not self.options.keep_billing_header:
            messages, removed = normalize_billing_header(messages)
            if removed:
                debug(2, "Normalized the volatile billing-header line", {"lines_removed": removed})
        if reader is None or not images:
            return self.profile.template.render(messages, request.tools), omitted
        read = [reader.read(image.data) for image in images if image.data is not None]
        rendered = self.profile.template.render(messages, request.tools, expanding(reader.marker, read))
        return dataclasses.replace(rendered, images=locate_images(rendered.tokens, read)), omitted

    def _sampling(self, request: ChatRequest) -> Sampling:
        """The request's sampling over the defaults; a default repetition penalty stays off structured output.

        JSON repeats tokens by design (keys, quotes, braces): measured on the
        default model, its card's penalty of 1.1 kept forced calls from closing
        their arguments within 200 tokens, and cut a two-city request to one
        call.  Output that is free until a call starts (tools with ``auto``, an
        agent's every turn) keeps it: without it a small model's prose runs to
        the token limit.  A penalty the request asks for itself still applies.
        """
        sampling = request.sampling.over(self.default_sampling)
        structured = request.json_schema is not None or request.tool_mode == "required"
        if structured and request.sampling.repetition_penalty is None:
            sampling = dataclasses.replace(sampling, repetition_penalty=None).over(PLAIN_SAMPLING)
        return sampling

    def _raw_prompt(self, request: ChatRequest) -> list[int]:
        """The legacy completions prompt: token ids as given, or text (with a suffix: fill-in-the-middle)."""
        if isinstance(request.prompt, tuple):
            vocabulary = self.profile.vocabulary_size
            if any(token >= vocabulary for token in request.prompt):
                raise InvalidRequestError(f"token ids must be below the vocabulary size ({vocabulary})", "prompt")
            return list(request.prompt)
        text = request.prompt or ""
        if request.suffix is not None:
            text = fill_in_the_middle(self.profile.fim_markers, text, request.suffix)
        return [int(token) for token in self.tokenizer.encode(text)]

    def _output_rules(
        self, request: ChatRequest, reasoning: ReasoningSyntax | None, max_tokens: int
    ) -> tuple[str | None, ToolCalling | None]:
        """The grammar the output must follow (None: free) and how to find tool calls in it (None: do not look).

        Calls are written in the model's own format when its template renders
        tools (the model was trained on it), in the Hermes form that the
        injected tool block asks for otherwise.  Thinking before a forced call
        or JSON answer gets at most half of ``max_tokens``, so that the answer
        always has room.
        """
        mode = request.tool_mode
        call_format = self.profile.call_format if request.tools else HERMES
        markers = _call_marker_stems(call_format) if request.tools and mode == "none" else ()
        thinking = None
        if reasoning is not None and reasoning is not HARMONY_REASONING:
            thinking = ReasoningMarkers(reasoning.start, reasoning.end, reasoning.starts_inside)
        constraint = OutputConstraint(
            tools=request.tools,
            tool_mode=mode,
            forced_function=request.tool_choice.name,
            parallel_calls=request.parallel_tool_calls,
            json_schema=request.json_schema,
            call_format=call_format,
            reasoning=thinking,
            forbidden_markers=tuple(marker for marker in markers if marker),
            eos=self.profile.eos_token_ids,
            reasoning_budget=int(max_tokens * THINKING_SHARE_BEFORE_A_FORCED_ANSWER),
        )
        grammar = build_grammar(
            constraint,
            self.profile.grammar_writer(),
            request.tool_params,
            request.schema_param,
            self.profile.grammar_verdicts,
        )
        if not request.tools:
            return grammar, None
        tools = tuple((tool.name, tool.kind) for tool in request.tools)
        schemas = tuple(template_tool(tool) for tool in request.tools)
        return grammar, ToolCalling(call_format, tools, request.parallel_tool_calls, mode != "none", schemas)

    def _max_tokens(self, request: ChatRequest, prompt_length: int) -> int:
        """The completion's length limit, checked against the context.

        A completion limit is a ceiling: generation stops where the context
        ends (finish_reason ``length``).  Under ``--strict-max-tokens`` a
        dialect whose API refuses a limit past the context (OpenAI's) answers
        with its 400 instead.  A prompt that does not fit at all is always an
        overflow error.
        """
        context = self.context_length
        room = context - prompt_length
        requested = request.max_tokens
        if room < 1:
            raise ContextOverflowError(context, prompt_length, None, "messages")
        if requested is None:
            return min(self.options.default_max_tokens, room)
        if requested > room and request.length_policy == "reject" and self.options.strict_max_tokens:
            raise ContextOverflowError(context, prompt_length, requested, request.length_param)
        return min(requested, room)

    def _look_up_answer(
        self, prompt: RenderedPrompt, max_tokens: int, sampling: Sampling, grammar: str | None
    ) -> tuple[str | None, CachedAnswer | None]:
        """Deterministic requests (greedy, or seeded) may be answered from the answer cache.

        The key is the rendered prompt (messages, tools and template together; images by content) and everything
        that shapes the output.
        """
        cache = self.answers
        if cache is None or not cache.max_entries or not sampling.deterministic:
            return None, None
        images = [image.image.digest.hex() for image in prompt.images]
        key = cache.key_for({"prompt": prompt.tokens, "images": images, "max_tokens": max_tokens, "grammar": grammar,
                             **asdict(sampling)})  # fmt: skip
        return key, cache.get(key)


class ChatRun:
    """One request, from the engine's events to neutral events.

    ``begin()`` (optional) waits for the request to be admitted, so that
    failures before its first token become plain errors and the prompt's usage
    is known before a response starts; then read ``events()`` once, or
    ``complete()``.  Leaving early (a cancelled task, a closed iteration)
    stops generation.
    """

    def __init__(
        self,
        service: ChatService,
        prompt: RenderedPrompt,
        generation: GenerationRequest,
        parser: OutputParser,
        timer: PerformanceTimer,
        answer_key: str | None,
        cached: CachedAnswer | None,
        end: Callable[[], None] = lambda: None,
        omitted: Omitted = NOTHING_OMITTED,
    ) -> None:
        self._service = service
        self._end = end
        self.omitted = omitted  # attachments the prompt left out (images on a text model)
        self._prompt = prompt
        self._generation = generation
        self._parser = parser
        self._timer = timer
        self._answer_key = answer_key
        self._cached = cached
        self._source: AsyncGenerator[EngineEvent, None] | None = None
        self._started: Started | None = None
        self._end_early: Callable[[], None] = lambda: None
        self._explain: Callable[[], MissExplanation] | None = None
        self._silent = False

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt.tokens)

    @property
    def started(self) -> Started | None:
        """The admission, once ``begin()`` or ``events()`` has seen it."""
        return self._started

    def explain_miss(self) -> MissExplanation | None:
        """Where the prompt left the cache (a miss or a partial hit, once started); renders templates."""
        return self._explain() if self._explain is not None else None

    async def begin(self) -> Started | None:
        """Wait until the engine admits the request, or until the first keep-alive (None: still waiting).

        Raises the engine's refusal (``KVBudgetError``, ``GrammarError``) if it comes first.
        """
        if self._started is not None:
            return self._started
        try:
            while self._started is None:
                event = await self._next_event()
                if isinstance(event, KeepAlive):
                    self._silent = True  # the stream begins with this keep-alive
                    return None
                self._admit(event)
        except BaseException as error:
            self._timer.stop(error)
            self._end()
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
        """``Started``, deltas as they are generated (keep-alives when silent), then ``Finished``.

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
            if self._source is not None:
                await self._source.aclose()
            self._timer.stop(failure)
            self._end()

    # -- the engine's events -> chat events -------------------------------------------

    async def _next_event(self) -> EngineEvent:
        if self._source is None:
            self._source = self._engine_events()
        return await self._source.__anext__()

    def _engine_events(self) -> AsyncGenerator[EngineEvent, None]:
        if self._cached is not None:
            return _replay(self._cached, self.prompt_tokens)
        return self._service.engine.stream(self._generation)

    def _admit(self, event: EngineEvent) -> None:
        if not isinstance(event, PromptAdmitted):
            raise AssertionError(f"the engine sent {type(event).__name__} before admitting the request")
        lookup = event.lookup
        self._end_early = event.end_early
        written = 0 if lookup.source in ("off", "response") else self.prompt_tokens - lookup.cached_tokens
        self._started = Started(PromptUsage(self.prompt_tokens, lookup.cached_tokens, written), lookup)
        if lookup.source != "response":
            self._record_lookup(lookup)

    def _record_lookup(self, lookup: CacheLookup) -> None:
        prompt, service = self._prompt, self._service
        self._explain = service.diagnostics.explainer(lookup, prompt.messages, prompt.tools)
        if lookup.source != "off":
            service.diagnostics.record(lookup, prompt.tokens, self._explain)

    async def _events(self, streamed: bool) -> AsyncIterator[ChatEvent]:
        if self._silent:
            yield Keepalive()
        while self._started is None:
            event = await self._next_event()
            if isinstance(event, KeepAlive):
                yield Keepalive()
            else:
                self._admit(event)
        yield self._started
        text_parts: list[str] = []
        reasoning_parts: list[str] = []
        content_parts: list[str] = []
        stats: GenerationStats | None = None
        while stats is None:
            event = await self._next_event()
            if isinstance(event, KeepAlive):
                yield Keepalive()
            elif isinstance(event, GenerationFinished):
                stats = event.stats
            elif isinstance(event, GeneratedText):
                if "prompt_processed" not in self._timer.checkpoints:
                    self._timer.checkpoint("prompt_processed")
                text_parts.append(event.text)
                for delta in self._deltas(self._parser.feed(event.text), reasoning_parts, content_parts):
                    yield delta
                if self._parser.repeated_a_call:
                    self._end_early()  # a forced call started over: the reply is complete
        for observe in self._service.observers:
            observe(stats)
        if stats.finish_reason == "timeout":
            error = RequestTimeoutError(stats.completion_tokens)
            logger.warning("Chat request stopped: %s", error.message)
            raise error
        for delta in self._deltas(self._parser.finish(), reasoning_parts, content_parts):
            yield delta
        self._timer.checkpoint("inference_complete")
        calls = list(self._parser.calls)
        finish_reason = "tool_calls" if calls and stats.finish_reason == "stop" else stats.finish_reason
        self._remember("".join(text_parts), stats)
        _log_completion(stats, finish_reason, streamed, len(calls), self._service.name)
        completion = Completion(
            text="".join(content_parts),
            reasoning="".join(reasoning_parts),
            tool_calls=calls,
            stats=stats,
            finish_reason=finish_reason,
            usage=Usage(self._started.usage, stats.completion_tokens),
            stop_sequence=stats.stop_sequence,
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

    def _remember(self, text: str, stats: GenerationStats) -> None:
        cache = self._service.answers
        if cache is None or self._answer_key is None or self._cached is not None:
            return
        if stats.finish_reason in ("stop", "length"):
            cached = CachedAnswer(
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
