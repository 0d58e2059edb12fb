"""Preparing a chat: a request, a model's profile and the server's options in, a prepared chat out.

Everything a request needs before the engine sees it is decided here, in one
step that reads nothing but its arguments: its attachments read within their
limits (documents as text, images as placeholders or the model's image
tokens), the prompt rendered through the model's chat template (billing line
removed, tools in the template), the completion's length under the length
policy, the output rules (a grammar in the model's call format, how to find
tool calls), the sampling laid over the defaults, and the key under which an
exact answer may be replayed.  It may take a while (a PDF, a screenshot, a
long conversation to tokenize), so the chat service runs it off the event
loop; it raises a ``ServerError`` on bad input and never touches the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_server.chat.answer_cache import AnswerCache
from mlx_server.chat.attachments import NOTHING_OMITTED, AttachmentLimits, Omitted, prepare
from mlx_server.chat.call_formats import HARMONY, HERMES, ToolCallFormat
from mlx_server.chat.grammars import OutputConstraint, ReasoningMarkers, build_grammar
from mlx_server.chat.image_prompts import expanding, locate_images
from mlx_server.chat.output import HARMONY_REASONING, ReasoningSyntax, reasoning_syntax
from mlx_server.chat.profile import ModelProfile
from mlx_server.chat.prompts import RenderedPrompt, fill_in_the_middle, normalize_billing_header
from mlx_server.chat.request import ChatRequest
from mlx_server.chat.text_guard import IMAGE_SLOT
from mlx_server.chat.thinking import ThinkingPlan, ThinkingRequest, resolve
from mlx_server.chat.tool_parsing import ToolCalling
from mlx_server.chat.tool_prompts import template_tool
from mlx_server.vocabulary import (
    PLAIN_SAMPLING,
    ContextOverflowError,
    GenerationRequest,
    InvalidRequestError,
    Sampling,
)
from utils_logging import debug

__all__ = [
    "THINKING_SHARE_BEFORE_A_FORCED_ANSWER",
    "PreparedChat",
    "ServiceOptions",
    "prepare_chat",
    "render",
    "thinking_plan",
]

THINKING_SHARE_BEFORE_A_FORCED_ANSWER = 0.5  # of max_tokens: the rest is room for the call or JSON


@dataclass(frozen=True)
class ServiceOptions:
    """The server settings the chat core reads (their defaults live in ``settings``).

    ``default_sampling`` is the server's ``--default-*`` options: it fills
    what a request leaves unset, before the model's own recommendation;
    ``thinking`` is ``--thinking`` and ``--thinking-budget``, likewise.
    """

    default_max_tokens: int
    default_sampling: Sampling
    keep_billing_header: bool
    request_timeout: float  # 0: none
    keepalive_interval: float  # 0: none
    strict_max_tokens: bool = False  # OpenAI's 400 for a completion limit past the context, instead of a cap
    attachments: AttachmentLimits = field(default_factory=AttachmentLimits)
    thinking: ThinkingRequest = field(default_factory=ThinkingRequest)


@dataclass(frozen=True)
class PreparedChat:
    """A request ready for the engine: its prompt, what the engine is asked, and how to read what comes back.

    ``answer_key`` is where a deterministic answer is kept (None: it is not
    replayable); ``echo`` is the prompt's text when a legacy completion asked
    for it back.
    """

    prompt: RenderedPrompt
    generation: GenerationRequest
    reasoning: ReasoningSyntax | None
    tool_calling: ToolCalling | None
    omitted: Omitted = NOTHING_OMITTED
    answer_key: str | None = None
    echo: str = ""


def prepare_chat(
    request: ChatRequest,
    profile: ModelProfile,
    options: ServiceOptions,
    context_length: int,
    request_id: str,
    answers: AnswerCache | None = None,
) -> PreparedChat:
    """The prepared chat (``ServerError`` on anything the request cannot be answered as sent)."""
    thinking = thinking_plan(request, profile, options)
    prompt, omitted = render(request, profile, options, context_length, thinking)
    if omitted:
        debug(1, "Left out attachments this model cannot read", {"left_out": omitted.describe()})
    if prompt.images:
        image_tokens = sum(image.length for image in prompt.images)
        debug(1, "Images in the prompt", {"images": len(prompt.images), "image_tokens": image_tokens})
    reasoning = reasoning_syntax(profile.tokenizer, prompt.tokens, profile.harmony)
    max_tokens = _max_tokens(request, len(prompt.tokens), options, context_length)
    grammar, tool_calling = _output_rules(request, profile, reasoning, max_tokens, thinking.budget)
    sampling = _sampling(request, profile, options)
    answer_key = _answer_key(answers, prompt, max_tokens, sampling, grammar)
    debug(
        2,
        "Generation settings",
        lambda: {
            "prompt_tokens": len(prompt.tokens),
            "stable_prefix": prompt.stable_prefix,
            "tool_calls": "off" if tool_calling is None else tool_calling.call_format.name,
            **thinking.options,
            **({"thinking_budget": thinking.budget} if thinking.budget is not None else {}),
            "max_tokens": max_tokens,
            **sampling.given(),
            "grammar": "none" if grammar is None else f"{len(grammar)} characters",
        },
    )
    generation = GenerationRequest(
        prompt.tokens,
        max_tokens,
        sampling,
        grammar,
        stable_prefix=prompt.stable_prefix,
        turn_start=prompt.turn_start,
        after_user=prompt.after_user,
        lane=request.lane,
        timeout=options.request_timeout or None,
        images=prompt.images,
        request_id=request_id,
    )
    echo = _echo(request, profile) if request.echo else ""
    return PreparedChat(prompt, generation, reasoning, tool_calling, omitted, answer_key, echo)


def default_sampling(profile: ModelProfile, options: ServiceOptions) -> Sampling:
    """What a request that sets nothing samples with: the server's options, the models config's for this model,
    the model's own recommendation, then plain sampling."""
    return options.default_sampling.over(profile.configured).over(profile.recommended.sampling).over(PLAIN_SAMPLING)


def thinking_plan(request: ChatRequest, profile: ModelProfile, options: ServiceOptions) -> ThinkingPlan:
    """The request's thinking over the server's default, on the model's own controls (said when it has none)."""
    plan = resolve(request.thinking, options.thinking, profile.thinking)
    if plan.ignored:
        asked = request.thinking.over(options.thinking)
        debug(1, "Thinking settings this model has no control for", {
            "ignored": {name: asked.given()[name] for name in plan.ignored}, "param": request.thinking.param,
            "model_controls": profile.thinking.describe(),
        })  # fmt: skip
    return plan


def render(
    request: ChatRequest,
    profile: ModelProfile,
    options: ServiceOptions,
    context_length: int,
    thinking: ThinkingPlan | None = None,
) -> tuple[RenderedPrompt, Omitted]:
    """The prompt, and what it left out of the messages' attachments (images on a text model)."""
    template_options = (thinking or thinking_plan(request, profile, options)).template_options
    if request.prompt is not None:
        tokens = _raw_prompt(request, profile)
        if not tokens:
            raise InvalidRequestError("the prompt is empty: send at least one token of text", "prompt")
        return RenderedPrompt(tokens), NOTHING_OMITTED
    reader = profile.images
    limits = options.attachments
    slot = IMAGE_SLOT if reader is not None else None
    messages, omitted, images = prepare(request.messages, slot, limits, context_length)
    if not options.keep_billing_header:
        messages, removed = normalize_billing_header(messages)
        if removed:
            debug(2, "Normalized the volatile billing-header line", {"lines_removed": removed})
    if reader is None or not images:
        return profile.template.render(messages, request.tools, options=template_options), omitted
    read = [reader.read(image.data, limits.max_image_pixels) for image in images if image.data is not None]
    rendered = profile.template.render(messages, request.tools, expanding(IMAGE_SLOT, read), template_options)
    return dataclasses.replace(rendered, images=locate_images(rendered.tokens, read)), omitted


def _echo(request: ChatRequest, profile: ModelProfile) -> str:
    """The legacy completion's prompt as text, for ``echo``."""
    prompt = request.prompt
    return prompt if isinstance(prompt, str) else str(profile.tokenizer.decode(list(prompt or ())))


def _sampling(request: ChatRequest, profile: ModelProfile, options: ServiceOptions) -> Sampling:
    """The request's sampling over the defaults; a default repetition penalty stays off structured output.

    JSON repeats tokens by design (keys, quotes, braces): measured on the
    default model, its card's penalty of 1.1 kept forced calls from closing
    their arguments within 200 tokens, and cut a two-city request to one
    call.  Output that is free until a call starts (tools with ``auto``, an
    agent's every turn) keeps it: without it a small model's prose runs to
    the token limit.  A penalty the request asks for itself still applies.
    """
    sampling = request.sampling.over(default_sampling(profile, options))
    structured = request.json_schema is not None or request.tool_mode == "required"
    if structured and request.sampling.repetition_penalty is None:
        sampling = dataclasses.replace(sampling, repetition_penalty=None).over(PLAIN_SAMPLING)
    return sampling


def _raw_prompt(request: ChatRequest, profile: ModelProfile) -> list[int]:
    """The legacy completions prompt: token ids as given, or text (with a suffix: fill-in-the-middle)."""
    if isinstance(request.prompt, tuple):
        vocabulary = profile.vocabulary_size
        if any(token >= vocabulary for token in request.prompt):
            raise InvalidRequestError(f"token ids must be below the vocabulary size ({vocabulary})", "prompt")
        return list(request.prompt)
    text = request.prompt or ""
    if request.suffix is not None:
        text = fill_in_the_middle(profile.fim_markers, text, request.suffix)
    return [int(token) for token in profile.tokenizer.encode(text)]


def _output_rules(
    request: ChatRequest,
    profile: ModelProfile,
    reasoning: ReasoningSyntax | None,
    max_tokens: int,
    thinking_budget: int | None = None,
) -> tuple[str | None, ToolCalling | None]:
    """The grammar the output must follow (None: free) and how to find tool calls in it (None: do not look).

    Calls are written in the model's own format when its template renders
    tools (the model was trained on it), in the Hermes form that the
    injected tool block asks for otherwise.  Thinking before a forced call
    or JSON answer gets at most half of ``max_tokens``, so that the answer
    always has room; a thinking budget bounds it whatever follows.
    gpt-oss's output is harmony channels whether it calls or not.
    """
    mode = request.tool_mode
    call_format = profile.call_format if request.tools else HARMONY if profile.harmony else HERMES
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
        eos=profile.eos_token_ids,
        reasoning_budget=int(max_tokens * THINKING_SHARE_BEFORE_A_FORCED_ANSWER),
        thinking_budget=thinking_budget,
    )
    grammar = build_grammar(
        constraint, profile.grammar_writer(), request.tool_params, request.schema_param, profile.grammar_verdicts
    )
    if not request.tools:
        return grammar, None
    tools = tuple((tool.name, tool.kind) for tool in request.tools)
    schemas = tuple(template_tool(tool) for tool in request.tools)
    return grammar, ToolCalling(call_format, tools, request.parallel_tool_calls, mode != "none", schemas)


def _max_tokens(request: ChatRequest, prompt_length: int, options: ServiceOptions, context: int) -> int:
    """The completion's length limit, checked against the context.

    A completion limit is a ceiling: generation stops where the context
    ends (finish_reason ``length``).  Under ``--strict-max-tokens`` a
    dialect whose API refuses a limit past the context (OpenAI's) answers
    with its 400 instead.  A prompt that does not fit at all is always an
    overflow error.
    """
    room = context - prompt_length
    requested = request.max_tokens
    if room < 1:
        raise ContextOverflowError(context, prompt_length, None, "messages")
    if requested is None:
        return min(options.default_max_tokens, room)
    if requested > room and request.length_policy == "reject" and options.strict_max_tokens:
        raise ContextOverflowError(context, prompt_length, requested, request.length_param)
    return min(requested, room)


def _answer_key(
    answers: AnswerCache | None, prompt: RenderedPrompt, max_tokens: int, sampling: Sampling, grammar: str | None
) -> str | None:
    """Where a deterministic request's answer (greedy, or seeded) is kept; None when it cannot be replayed.

    The key is the rendered prompt (messages, tools and template together; images by content) and everything
    that shapes the output.
    """
    if answers is None or not answers.max_entries or not sampling.deterministic:
        return None
    images = [image.image.digest.hex() for image in prompt.images]
    shaping: dict[str, Any] = {"prompt": prompt.tokens, "images": images, "max_tokens": max_tokens, "grammar": grammar}
    return answers.key_for({**shaping, **asdict(sampling)})


def _call_marker_stems(call_format: ToolCallFormat) -> tuple[str, ...]:
    """What may not appear under tool_choice none: each call marker without its closing ``>``.

    ``<tool_call`` rather than ``<tool_call>``: a model kept from the marker
    otherwise writes look-alikes such as ``<tool_call_local>``.
    """
    markers = [call_format.start, call_format.end, HERMES.start, HERMES.end]
    stems = [marker.removesuffix(">") for marker in markers if len(marker.removesuffix(">")) > 1]
    return tuple(dict.fromkeys(stems))
