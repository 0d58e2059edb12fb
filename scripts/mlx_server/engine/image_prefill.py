"""A vision model's prompt, prefilled through its images before the rest joins the batch.

mlx-lm's batch feeds token ids; an image's tokens need the embeddings the
vision tower computes.  So when a sequence is admitted, the part of its
prompt from where the prompt cache left off to the end of its last image is
run here, on the worker thread, with the embeddings mlx-vlm computes for it
(``VisionTower.span``), in prefill-step chunks that stop at the
sequence's pause points to keep their KV state; the text after the last
image is then prefilled by the batch as any prompt.  A second turn with the
same image finds its KV state in the prompt cache (keyed by the image's
content: ``cache_prompt``) and computes nothing here.  Where images take
M-RoPE's grid positions (Qwen-VL), the text after them sits at its index
plus the images' deltas (``position_shift``): a function of the prompt's
images up to a point, so a cached prefix's shift is that of its own images.

This part runs between two decode steps: the batch's other streams wait for
it, as they wait for any prefill chunk, but for the whole of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlx_server.engine.cache_entries import copy_prefix
from mlx_server.vocabulary import GenerationRequest, PromptImage

__all__ = ["cache_prompt", "position_shift", "prefill_through_images"]


def _image_id(image: PromptImage) -> int:
    """A token id no vocabulary has (negative), the same for every token of this image and unlike any other's."""
    return -1 - int.from_bytes(hashlib.sha256(image.image.digest).digest()[:4], "big") % (2**31 - 2)


def cache_prompt(request: GenerationRequest) -> list[int]:
    """The prompt as the prompt cache keys it: each image's tokens replaced by its content's id.

    Every image of one size has the same token ids (its marker and image
    tokens), so without this two screenshots would share KV state.
    """
    if not request.images:
        return request.prompt
    keyed = list(request.prompt)
    for image in request.images:
        keyed[image.start : image.end] = [_image_id(image)] * image.length
    return keyed


def position_shift(request: GenerationRequest, upto: int) -> int:
    """Where the token at ``upto`` sits on the model's position grid, less its index (the images' deltas before it)."""
    return sum(image.image.rope_delta for image in request.images if image.end <= upto)


def prefill_through_images(
    vision: Any,
    cache: list[Any],
    request: GenerationRequest,
    start: int,
    pauses: list[int],
    prefill_step: int,
    keep_state: Callable[[list[Any], list[int]], None],
    should_stop: Callable[[], bool],
    new_cache: Callable[[], list[Any]],
) -> tuple[list[Any], int]:
    """Prefill ``request.prompt`` from ``start`` through its last image; returns the cache and where it got to.

    ``keep_state(copy, tokens)`` is called at each pause point passed (the
    stable prefix, the end of the history).  A ``start`` inside an image (a
    cache entry that ends there) steps back to the image's start, or to
    nothing for a cache that cannot step back.  Stops early between chunks
    when ``should_stop()``.
    """
    prompt, images = request.prompt, request.images
    end = min(max(image.end for image in images), len(prompt) - 1)  # the batch needs one token to start from
    inside = next((image for image in images if image.start < start < image.end), None)
    if inside is not None:
        cache, start = (copy_prefix(cache, inside.start), inside.start) if _trimmable(cache) else (new_cache(), 0)
    if start >= end:
        return cache, start
    todo = [image for image in images if start <= image.start and image.end <= end]
    span = vision.span(prompt[start:end], todo, start + position_shift(request, start))
    stops = sorted({point for point in pauses if start < point <= end} | {end})
    position = start
    for stop in stops:
        while position < stop:
            if should_stop():
                return cache, position
            chunk_end = min(stop, position + prefill_step)
            span.prefill(position - start, chunk_end - start, cache)
            mx.eval([layer.state for layer in cache])
            position = chunk_end
        if stop in pauses:
            keep_state(copy_prefix(cache, stop), prompt[:stop])
    return cache, position


def _trimmable(cache: list[Any]) -> bool:
    return all(layer.is_trimmable() for layer in cache)
