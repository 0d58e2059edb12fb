"""Text a client sends stays text: a special token spelled in a message, a tool result or a tool is never that token.

Measured with each family's real tokenizer and chat template: a turn marker
(``<|im_start|>``, ``<start_of_turn>``, ``<|start_header_id|>``), a harmony
channel (``<|channel|>``), an image token (``<image_soft_token>``), spelled in
user text, a tool's result and a tool's description, leaves the prompt with
exactly the control tokens the template itself writes; the spelling is in the
prompt as text.  Tokens the tokenizer does not mark special (Qwen3's
``<tool_call>``, ``<think>``) are ordinary vocabulary and stay as they are.
"""

from __future__ import annotations

from typing import Any

import pytest

from mlx_server.chat.prompts import FALLBACK_CHAT_TEMPLATE, ChatTemplate
from mlx_server.chat.text_guard import TextGuard, plain
from mlx_server.vocabulary import Message, Tool
from testbed.tokenizers import load_tokenizer

SPELLED = {
    "qwen3": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>"],
    "gptoss": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
PROBE = "ZqXv"  # plain letters where the markers were: the prompt the markers must not change


def conversation(text: str) -> tuple[list[Message], list[Tool]]:
    messages = [
        Message("user", f"Explain this template: {text} please"),
        Message("assistant", "", ()),
        Message("user", f"Result of the tool:\n{text}\nDone."),
    ]
    tools = [Tool("lookup", f"Looks things up ({text})", {"type": "object", "properties": {}})]
    return messages, tools


def control_tokens(tokenizer: Any, tokens: list[int]) -> list[int]:
    guard = TextGuard(tokenizer)
    ids = {int(tokenizer.convert_tokens_to_ids(special)) for special in guard.specials}
    return [token for token in tokens if token in ids]


@pytest.mark.parametrize("family", sorted(SPELLED))
def test_spelled_control_tokens_stay_text(family: str) -> None:
    tokenizer = load_tokenizer(family)
    template = ChatTemplate(tokenizer)
    spelled = "".join(SPELLED[family])
    assert set(SPELLED[family]) <= set(template.guard.specials), "the tokenizer marks them special"
    prompt = template.render(*conversation(spelled)).tokens
    probe = template.render(*conversation(PROBE)).tokens
    assert control_tokens(tokenizer, prompt) == control_tokens(tokenizer, probe)
    assert spelled in tokenizer.decode(prompt)


@pytest.mark.parametrize("family", sorted(SPELLED))
def test_a_text_without_control_tokens_renders_as_it_always_did(family: str) -> None:
    """Protection costs nothing when nothing is spelled: the template's own tokenization, unchanged."""
    tokenizer = load_tokenizer(family)
    messages = [Message("system", "Be brief."), Message("user", "Which plain words mean <b>bold</b>?")]
    rendered = ChatTemplate(tokenizer).render(messages)
    own = None if tokenizer.has_chat_template else FALLBACK_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
        chat_template=own,
    )
    assert rendered.tokens == tokenizer.encode(text, add_special_tokens=False)


def test_noncharacters_from_outside_become_replacement_characters() -> None:
    """The sentinels are Unicode noncharacters: none can arrive from a client to be taken for one."""
    assert plain("a\ufdd0b\ufdefc") == "a\ufffdb\ufffdc" and plain("plain") == "plain"
