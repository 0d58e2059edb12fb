"""Chat messages -> prompt token ids, through the model's own chat template (``ChatTemplate``, one per model).

The messages' and tools' text is protected first (``text_guard``): a
special token spelled in it stays text.  Two things here exist for the prompt cache: the volatile billing-header line
that Claude Code puts at the start of its system prompt is removed before
tokenizing (it changes every request and would defeat any prefix cache), and
the stable prefix (system messages and tools, rendered alone) is measured so that the
cache can keep a checkpoint there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from mlx_server.chat.text_guard import TextGuard
from mlx_server.chat.tool_prompts import TemplateToolSupport, template_conversation, template_tool_support
from mlx_server.vocabulary import InvalidRequestError, Message, PromptImage, Tokenizer, Tool, UnsupportedOptionError

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "FIM_MARKERS",
    "ChatTemplate",
    "RenderedPrompt",
    "TemplateOptions",
    "fill_in_the_middle",
    "normalize_billing_header",
]

#: Stable prefixes (system prompt and tools) a template remembers having rendered.
PREFIXES_REMEMBERED = 64

# ``x-anthropic-billing-header: ...cch=<changes every request>`` as a whole line.
_BILLING_HEADER_LINE = re.compile(r"^x-anthropic-billing-header:[^\n]*(?:\n|$)", re.IGNORECASE | re.MULTILINE)

# ChatML, for models that ship without a template; every role is rendered.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def normalize_billing_header(messages: Sequence[Message]) -> tuple[list[Message], int]:
    """Drop the volatile billing-header line from system messages; returns the messages and lines removed."""
    removed = 0
    normalized: list[Message] = []
    for message in messages:
        if message.role == "system" and "billing-header" in message.content.lower():
            text, count = _BILLING_HEADER_LINE.subn("", message.content)
            if count:
                removed += count
                message = dataclasses.replace(message, content=text)
        normalized.append(message)
    return normalized, removed


TemplateOptions = tuple[tuple[str, Any], ...]
"""Variables a chat template reads besides the conversation (``enable_thinking``, ``reasoning_effort``), as pairs."""


def _render(
    tokenizer: Tokenizer,
    guard: TextGuard,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    rewrite: Callable[[str], str] | None = None,
    options: TemplateOptions = (),
) -> list[int]:
    """The template's tokens (its text, ``rewrite`` applied, tokenized as ``TextGuard.tokens`` says)."""
    template = None if tokenizer.has_chat_template else FALLBACK_CHAT_TEMPLATE
    extra: dict[str, Any] = {**dict(options), "tools": tools} if tools else dict(options)
    text = str(
        tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False, chat_template=template, **extra
        )
    )
    return guard.tokens(rewrite(text) if rewrite is not None else text)


Conversation = tuple[list[dict[str, Any]], "list[dict[str, Any]] | None"]
Rewrite = Callable[[str], str]


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt's tokens and the messages and tools it was rendered from, with what the prompt cache needs.

    ``stable_prefix`` ends the system prompt and tools; ``turn_start`` ends
    the history, before the generation prompt (see ``GenerationRequest``);
    ``images`` are a vision model's images, where their tokens are;
    ``options`` the template variables it was rendered with.
    """

    tokens: list[int]
    stable_prefix: int = 0
    turn_start: int = 0
    after_user: bool = False
    messages: tuple[Message, ...] = ()
    tools: tuple[Tool, ...] = ()
    images: tuple[PromptImage, ...] = ()
    options: TemplateOptions = ()


class ChatTemplate:
    """One model's chat template, with what is found about it once: tool support and the generation prompt.

    It also remembers the last few stable prefixes it rendered (system
    prompt and tools, by content and template options), since every turn of a
    conversation sends the same ones; the memo belongs to this model alone (one
    lock, held briefly).  ``options`` are template variables (a thinking
    switch, a reasoning level): they may change any part of the prompt, so
    every render takes them.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.guard = TextGuard(tokenizer)
        self.support: TemplateToolSupport = template_tool_support(tokenizer)
        self._openings: dict[TemplateOptions, tuple[int, ...]] = {}
        self._prefixes: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.generation_prompt = self.opening()

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        rewrite: Callable[[str], str] | None = None,
        options: TemplateOptions = (),
    ) -> RenderedPrompt:
        """The prompt for a conversation, with what the prompt cache needs to know about it.

        ``rewrite`` changes the rendered text before it is tokenized (a vision model's image markers expanded).
        """
        tokens, stable_prefix = self.tokens_with_prefix(messages, tools, rewrite, options)
        opening = self.opening(options)
        turn_start = 0
        if tokens[len(tokens) - len(opening) :] == list(opening):
            turn_start = len(tokens) - max(1, len(opening))
        after_user = bool(messages) and messages[-1].role == "user"
        return RenderedPrompt(
            tokens, stable_prefix, turn_start, after_user, tuple(messages), tuple(tools), options=options
        )

    def tokens(
        self, messages: Sequence[Message], tools: Sequence[Tool] = (), options: TemplateOptions = ()
    ) -> list[int]:
        """Token ids for ``messages`` and ``tools``, then the assistant's opening (InvalidRequestError if refused)."""
        return self._render_conversation(self._conversation(messages, tools), options=options)

    def tokens_with_prefix(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        rewrite: Callable[[str], str] | None = None,
        options: TemplateOptions = (),
    ) -> tuple[list[int], int]:
        """``tokens`` and ``stable_prefix_length`` together, preparing the template's input once."""
        conversation = self._conversation(messages, tools)
        prompt = self._render_conversation(conversation, rewrite, options)
        return prompt, self._stable_prefix(conversation, prompt, options)

    def stable_prefix_length(
        self, messages: Sequence[Message], prompt: list[int], tools: Sequence[Tool] = (), options: TemplateOptions = ()
    ) -> int:
        """How many leading prompt tokens are the system messages and tools alone (0 if the template mixes them).

        The leading system/developer messages are rendered on their own, with the
        tools; if the prompt starts with exactly those tokens, that is where a
        conversation's stable part ends, whatever its last message is (user, tool
        or assistant).
        """
        return self._stable_prefix(self._conversation(messages, tools), prompt, options)

    def opening(self, options: TemplateOptions = ()) -> tuple[int, ...]:
        """The tokens the template adds to open the assistant's turn (``<|im_start|>assistant\\n``), per options.

        Empty when the template opens the turn whether asked or not (the history then ends with the opening).
        """
        with self._lock:
            known = self._openings.get(options)
        if known is None:
            known = self._find_generation_prompt(options)
            with self._lock:
                self._openings[options] = known
        return known

    def message_at_token(
        self, messages: Sequence[Message], tools: Sequence[Tool], offset: int, options: TemplateOptions = ()
    ) -> tuple[int, str] | None:
        """Which message (index and role) the prompt's token ``offset`` falls in; None if the template cannot say.

        Renders growing prefixes of the conversation (a binary search, so about
        log2(len(messages)) renders); used to explain a prompt-cache miss.
        """
        conversation, template_tools = self._conversation(messages, tools)
        shift = len(conversation) - len(messages)  # 1 when a system message was added for the tool block
        low, high = 0, len(conversation) - 1
        try:
            while low < high:
                middle = (low + high) // 2
                rendered = _render(
                    self.tokenizer, self.guard, conversation[: middle + 1], False, template_tools, options=options
                )
                if len(rendered) > offset:
                    high = middle
                else:
                    low = middle + 1
        except (TemplateError, ValueError):
            return None
        if not conversation:
            return None
        return max(0, low - shift), str(conversation[low]["role"])

    # -- inside ---------------------------------------------------------------------------------

    def _conversation(self, messages: Sequence[Message], tools: Sequence[Tool]) -> Conversation:
        """What the template is given: the messages and tools with their text protected (``TextGuard``)."""
        return template_conversation(
            self.support, self.guard.protect_messages(messages), self.guard.protect_tools(tools)
        )

    def _render_conversation(
        self, conversation: Conversation, rewrite: Callable[[str], str] | None = None, options: TemplateOptions = ()
    ) -> list[int]:
        try:
            return _render(self.tokenizer, self.guard, conversation[0], True, conversation[1], rewrite, options)
        except (TemplateError, ValueError) as error:
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {error}", "messages"
            ) from error

    def _preamble(self, template_tools: list[dict[str, Any]] | None, options: TemplateOptions) -> list[int]:
        """What the template writes before the first message of a conversation without a system message.

        Templates that add a default system prompt (SmolLM2's "You are a
        helpful AI assistant...") or render the tools in a system block of
        their own start every such conversation with the same tokens: the
        common prefix of a conversation that opens with a user message and
        one that opens with an assistant message.
        """
        try:
            user = _render(
                self.tokenizer, self.guard, [{"role": "user", "content": "probe"}], False, template_tools, None, options
            )
            assistant = _render(
                self.tokenizer, self.guard, [{"role": "assistant", "content": "probe"}], False, template_tools, None,
                options,
            )  # fmt: skip
        except ValueError:
            return []
        shared = next(
            (index for index, (a, b) in enumerate(zip(user, assistant)) if a != b), min(len(user), len(assistant))
        )
        return user[:shared]

    def _find_generation_prompt(self, options: TemplateOptions) -> tuple[int, ...]:
        probe = [{"role": "user", "content": "probe"}]
        try:
            closed, opened = (
                _render(self.tokenizer, self.guard, probe, False, options=options),
                _render(self.tokenizer, self.guard, probe, True, options=options),
            )
        except (TemplateError, ValueError):
            return ()
        return tuple(opened[len(closed) :]) if opened[: len(closed)] == closed else ()

    def _stable_prefix(self, conversation: Conversation, prompt: list[int], options: TemplateOptions) -> int:
        messages, template_tools = conversation
        leading = []
        for message in messages:
            if message["role"] != "system":
                break
            leading.append(message)
        key = hashlib.sha256(json.dumps([leading, template_tools, options], sort_keys=True).encode()).hexdigest()
        with self._lock:
            prefix = self._prefixes.get(key)
        if prefix is None:
            try:
                prefix = (
                    _render(self.tokenizer, self.guard, leading, False, template_tools, options=options)
                    if leading
                    else self._preamble(template_tools, options)
                )
            except TemplateError:
                prefix = []
            with self._lock:
                self._prefixes[key] = prefix
                while len(self._prefixes) > PREFIXES_REMEMBERED:
                    self._prefixes.popitem(last=False)
        if prefix and len(prefix) < len(prompt) and prompt[: len(prefix)] == prefix:
            return len(prefix)
        return 0


#: (prefix, suffix, middle) marker tokens of the fill-in-the-middle conventions models are trained on.
FIM_MARKERS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen 2.5 Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek Coder
    ("<PRE>", "<SUF>", "<MID>"),  # Code Llama
)


def fill_in_the_middle(markers: tuple[str, str, str] | None, prefix: str, suffix: str) -> str:
    """The prompt for completing between ``prefix`` and ``suffix``, in the model's own FIM ``markers``.

    UnsupportedOptionError when the model has none of the known marker sets (it was not trained for it).
    """
    if markers is not None:
        begin, hole, end = markers
        return f"{begin}{prefix}{hole}{suffix}{end}"
    raise UnsupportedOptionError(
        "suffix", "suffix (fill-in-the-middle) needs a model whose tokenizer has FIM tokens; this one has none"
    )
