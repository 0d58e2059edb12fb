"""A vision model's prompt: each image slot in the rendered text becomes that image's own text and tokens.

The chat template renders an image as the chat core's slot (``IMAGE_SLOT``,
a character no client can send, so no text a client writes can make one);
the model's processor says what one image expands to
(Gemma 3: newlines, the marker, 256 image tokens, the end marker, newlines).
As the processor itself does, the expansion happens in the rendered text,
which is then tokenized whole (so a newline before an image merges with the
expansion's newlines exactly as it did in training); each image is then found
in the tokens by its own run of tokens (``ReadImage.tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mlx_server.vocabulary import InvalidRequestError, PromptImage, ReadImage

__all__ = ["expanding", "locate_images"]


def expanding(slot: str, images: Sequence[ReadImage]) -> Callable[[str], str]:
    """A rewrite of the rendered text: the k-th ``slot`` becomes the k-th image's text.

    InvalidRequestError when slots and images do not pair up (a chat template that dropped or repeated a message).
    """

    def rewrite(text: str) -> str:
        pieces = text.split(slot)
        if len(pieces) - 1 != len(images):
            raise InvalidRequestError(
                f"the model's chat template rendered {len(pieces) - 1} of the conversation's {len(images)} images: "
                "it drops or repeats messages that hold them",
                "messages",
            )
        expanded = [pieces[0]]
        for image, piece in zip(images, pieces[1:], strict=True):
            expanded += [image.text, piece]
        return "".join(expanded)

    return rewrite


def locate_images(tokens: list[int], images: Sequence[ReadImage]) -> tuple[PromptImage, ...]:
    """Where each image's tokens are in the prompt, in order (InvalidRequestError if one cannot be found)."""
    placed: list[PromptImage] = []
    position = 0
    for image in images:
        run = list(image.tokens)
        width = len(run)
        while position + width <= len(tokens) and tokens[position : position + width] != run:
            position += 1
        if position + width > len(tokens):
            raise InvalidRequestError("an image's tokens could not be placed in the prompt", "messages")
        placed.append(PromptImage(position, width, image))
        position += width
    return tuple(placed)
