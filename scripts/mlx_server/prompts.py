"""Chat messages -> prompt token ids, through the model's own chat template."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_server.errors import APIError
from mlx_server.schemas import ChatMessage

__all__ = ["FALLBACK_CHAT_TEMPLATE", "render_prompt"]

# ChatML, for models that ship without a template; every role is rendered.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _as_template_message(message: ChatMessage) -> dict[str, Any]:
    """The dict a chat template expects; ``developer`` is rendered as ``system``."""
    rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
    rendered["content"] = message.text()
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        rendered["tool_calls"] = message.tool_calls
    return rendered


def render_prompt(tokenizer: TokenizerWrapper, messages: list[ChatMessage]) -> list[int]:
    """Token ids for ``messages`` plus the assistant turn's opening; a template error is a 400."""
    conversation = [_as_template_message(message) for message in messages]
    template = None if tokenizer.has_chat_template else FALLBACK_CHAT_TEMPLATE
    try:
        tokens = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, chat_template=template
        )
    except TemplateError as error:
        raise APIError(400, f"the model's chat template rejected the messages: {error}", param="messages") from error
    if isinstance(tokens, dict):  # some transformers versions return a BatchEncoding
        tokens = tokens["input_ids"]
    return [int(token) for token in tokens]
