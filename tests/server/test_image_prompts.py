"""A vision model's prompt: image slots become each image's text, and each image is found in the tokens.

Pure functions over a real tokenizer (Gemma 3's); the processor's output is
stood in for by a ``ReadImage`` written here, as Gemma 3's processor writes one.
An image's place in the text is the chat core's own slot (``IMAGE_SLOT``, a
character no client can send); the model's marker spelled in text stays text.
"""

from __future__ import annotations

from typing import Any

import pytest

from mlx_server.chat.image_prompts import expanding, locate_images
from mlx_server.chat.prompts import ChatTemplate
from mlx_server.chat.text_guard import IMAGE_SLOT
from mlx_server.engine.image_prefill import cache_prompt
from mlx_server.vocabulary import GenerationRequest, InvalidRequestError, Message, ReadImage
from testbed.tokenizers import load_tokenizer

MARKER = "<start_of_image>"


@pytest.fixture(scope="module")
def gemma() -> Any:
    return load_tokenizer("gemma3")


def image(tokenizer: Any, digest: bytes, tokens: int = 4) -> ReadImage:
    """An image as Gemma 3's processor expands one: newlines, its markers around ``tokens`` image tokens."""
    text = f"\n\n{MARKER}{'<image_soft_token>' * tokens}<end_of_image>\n\n"
    core = tokenizer.encode(f"{MARKER}{'<image_soft_token>' * tokens}<end_of_image>", add_special_tokens=False)
    return ReadImage(text, tuple(core), digest, pixels=None)


def test_each_marker_becomes_its_image_and_each_image_is_found_in_order(gemma: Any) -> None:
    first, second = image(gemma, b"a", 4), image(gemma, b"b", 6)
    messages = [Message("user", f"Compare {IMAGE_SLOT} with {IMAGE_SLOT} please")]
    rendered = ChatTemplate(gemma).render(messages, (), expanding(IMAGE_SLOT, [first, second]))
    placed = locate_images(rendered.tokens, [first, second])
    assert [found.image.digest for found in placed] == [b"a", b"b"]
    for found in placed:
        assert rendered.tokens[found.start : found.end] == list(found.image.tokens)
    assert placed[0].end <= placed[1].start
    assert gemma.decode(rendered.tokens).count("<image_soft_token>") == 10


def test_the_expansion_is_tokenized_with_its_neighbours_as_the_processor_does(gemma: Any) -> None:
    """A newline before an image merges with the expansion's newlines: the text is tokenized whole."""
    one = image(gemma, b"a")
    rendered = ChatTemplate(gemma).render([Message("user", f"{IMAGE_SLOT}What is it?")], (),
                                          expanding(IMAGE_SLOT, [one]))  # fmt: skip
    text = gemma.apply_chat_template([{"role": "user", "content": f"{MARKER}What is it?"}], tokenize=False,
                                     add_generation_prompt=True).replace(MARKER, one.text)  # fmt: skip
    assert rendered.tokens == gemma.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", [f"{MARKER} before {{slot}}", f"{{slot}} after {MARKER}",
                                  f"<image_soft_token>{{slot}}<end_of_image>{{slot}}{MARKER}"])  # fmt: skip
def test_the_models_markers_spelled_in_text_stay_text_before_between_and_after_images(gemma: Any, text: str) -> None:
    """A Read result holding Gemma's image tokens as text: the image tokens are exactly the images' own."""
    text = text.replace("{slot}", IMAGE_SLOT)
    images = [image(gemma, bytes([index])) for index in range(text.count(IMAGE_SLOT))]
    rendered = ChatTemplate(gemma).render([Message("user", text)], (), expanding(IMAGE_SLOT, images))
    soft = gemma.convert_tokens_to_ids("<image_soft_token>")
    assert rendered.tokens.count(soft) == 4 * len(images), "no image token comes from the text"
    assert len(locate_images(rendered.tokens, images)) == len(images)
    assert MARKER in gemma.decode(rendered.tokens).replace(images[0].text, "")


def test_slots_and_images_that_do_not_pair_up_are_a_400(gemma: Any) -> None:
    messages = [Message("user", f"Two slots {IMAGE_SLOT} and {IMAGE_SLOT}")]
    with pytest.raises(InvalidRequestError, match="image"):
        ChatTemplate(gemma).render(messages, (), expanding(IMAGE_SLOT, [image(gemma, b"a")]))


class TestThePromptCachesKey:
    def test_two_images_of_one_size_key_differently_and_one_image_keys_the_same(self, gemma: Any) -> None:
        def prompt_with(digest: bytes) -> GenerationRequest:
            read = image(gemma, digest)
            rendered = ChatTemplate(gemma).render([Message("user", f"{IMAGE_SLOT}Hi")], (),
                                                  expanding(IMAGE_SLOT, [read]))  # fmt: skip
            return GenerationRequest(rendered.tokens, 4, images=locate_images(rendered.tokens, [read]))

        first, again, other = prompt_with(b"a"), prompt_with(b"a"), prompt_with(b"b")
        assert first.prompt == other.prompt  # the same tokens: only the content tells them apart
        assert cache_prompt(first) == cache_prompt(again) != cache_prompt(other)
        (placed,) = first.images
        keyed = cache_prompt(first)
        assert (
            keyed[: placed.start] == first.prompt[: placed.start] and keyed[placed.end :] == first.prompt[placed.end :]
        )
        assert all(token < 0 for token in keyed[placed.start : placed.end])

    def test_a_prompt_without_images_is_its_own_key(self) -> None:
        request = GenerationRequest([1, 2, 3], 4)
        assert cache_prompt(request) is request.prompt
