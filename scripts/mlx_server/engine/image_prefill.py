"""A vision model's prompt, prefilled through its images before the rest joins the batch.

mlx-lm's batch feeds token ids; an image's tokens need the embeddings the
vision tower computes.  So the part of an admitted prompt from where the
prompt cache left off to the end of its last image is run here, on the
worker thread, with the embeddings mlx-vlm computes for it
(``VisionTower.span``): the tower's pass, then chunks that stop at the
sequence's pause points to keep their KV state, a unit between two decode
steps (``ImagePrefill``), so the streams decoding meanwhile never wait for a
whole image's prefill.  The text after the last image is then prefilled by
the batch as any prompt.  A second turn with the same image finds its KV
state in the prompt cache (keyed by the image's content: ``cache_prompt``)
and computes nothing here.  Where images take M-RoPE's grid positions
(Qwen-VL), the text after them sits at its index plus the images' deltas
(``position_shift``): a function of the prompt's images up to a point, so a
cached prefix's shift is that of its own images.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlx_server.engine.cache_entries import copy_prefix
from mlx_server.model.tower_pieces import evaluate_piece
from mlx_server.vocabulary import GenerationRequest, PromptImage

__all__ = ["ImagePrefill", "cache_prompt", "position_shift", "prefill_through_images"]


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


class ImagePrefill:
    """A prompt's prefill through its last image, done a unit at a time between the batch's decode steps.

    A unit is pieces of the vision tower's pass over the images for up to
    about a given time (``tower_pieces``), or one chunk of up to a given
    number of tokens of the span (the text before and between the images,
    and the images' own tokens).  The batch runs one unit per step, sized so
    that the streams decoding meanwhile wait about a quarter step more
    (``BatchDecoder``).  ``keep_state(copy, tokens)`` is called at
    each pause point passed (the stable prefix, the end of the history).  A
    ``start`` inside an image (a cache entry that ends there) steps back to
    the image's start, or to nothing for a cache that cannot step back.
    """

    def __init__(
        self,
        vision: Any,
        cache: list[Any],
        request: GenerationRequest,
        start: int,
        pauses: list[int],
        keep_state: Callable[[list[Any], list[int]], None],
        new_cache: Callable[[], list[Any]],
    ) -> None:
        self._vision, self._request, self._keep_state = vision, request, keep_state
        prompt, images = request.prompt, request.images
        self._end = min(max(image.end for image in images), len(prompt) - 1)  # the batch starts from one token
        inside = next((image for image in images if image.start < start < image.end), None)
        if inside is not None:
            cache, start = (copy_prefix(cache, inside.start), inside.start) if _trimmable(cache) else (new_cache(), 0)
        self.cache, self.position = cache, start
        self._pauses = [point for point in pauses if start < point <= self._end]
        self._span: Any = None
        self._pieces: list[mx.array] = []  # the tower's pass, then the span's embeddings: evaluated in order
        self._start = start

    @property
    def done(self) -> bool:
        return self.position >= self._end

    def advance(self, tokens: int, seconds: float = math.inf) -> int:
        """One unit of the work: pieces of the images' tower pass for up to about ``seconds``, or up to
        ``tokens`` of prefill; returns the tokens prefilled (0 for the tower's pieces)."""
        if self._span is None or self._pieces:  # the images are not read yet
            self._read_images(seconds)
            return 0
        stop = min([point for point in self._pauses if point > self.position] + [self._end])
        chunk_end = min(stop, self.position + max(1, tokens))
        self._span.prefill(self.position - self._start, chunk_end - self._start, self.cache)
        mx.eval([layer.state for layer in self.cache])
        done, self.position = chunk_end - self.position, chunk_end
        if self.position in self._pauses:
            self._keep_state(copy_prefix(self.cache, self.position), self._request.prompt[: self.position])
        return done

    def _read_images(self, seconds: float) -> None:
        """The vision tower's pass over the span's images, its pieces in order until ``seconds`` have passed
        (building its graph is a unit's work); the span's embeddings are a piece of their own, the last.

        (One pass over all the new images, as mlx-vlm's own generation
        makes it: the tower's arithmetic differs in its last bits with the
        number of images it reads together.  An agent's session brings its
        images a turn at a time, the earlier ones read from the cache.)
        """
        began, progressed = time.perf_counter(), False
        if self._span is None:
            request, start = self._request, self.position
            todo = [image for image in request.images if start <= image.start and image.end <= self._end]
            shift = position_shift(request, start)
            self._span = self._vision.span(request.prompt[start : self._end], todo, start + shift)
            self._pieces, progressed = [*self._span.pieces, self._span.embeddings], True
        if not math.isfinite(seconds):  # nothing to wait for it: one evaluation (each has its own cost)
            mx.eval(self._pieces[-1])
            self._pieces.clear()
        while self._pieces and not (progressed and time.perf_counter() - began >= seconds):
            evaluate_piece(self._pieces.pop(0))
            progressed = True


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
    """All of an ``ImagePrefill`` at once, in ``prefill_step`` chunks (one sequence at a time: nothing else is
    decoding); stops early between units when ``should_stop()``.  Returns the cache and where it got to."""
    work = ImagePrefill(vision, cache, request, start, pauses, keep_state, new_cache)
    while not work.done and not should_stop():
        work.advance(prefill_step)
    return work.cache, work.position


def _trimmable(cache: list[Any]) -> bool:
    return all(layer.is_trimmable() for layer in cache)
