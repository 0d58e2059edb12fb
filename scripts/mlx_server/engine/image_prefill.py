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

import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlx_server.engine.cache_entries import copy_prefix
from mlx_server.engine.side_thread import SideThread, Turn, TurnedWork
from mlx_server.model.tower_pieces import evaluate_piece
from mlx_server.vocabulary import GenerationRequest, PromptImage

__all__ = ["ImagePrefill", "cache_prompt", "position_shift", "prefill_through_images", "read_span"]


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

    A unit is the vision tower's work over the images for up to about a given
    time (building its graph, then evaluating its pieces: ``read_span``, on
    ``side``, a thread that stops part-way and goes on at the next unit), or
    one chunk of up to a given number of tokens of the span (the text before
    and between the images, and the images' own tokens).  Without ``side``
    the images are read in one go, on this thread.  The batch runs one unit
    per step, sized so that the streams decoding meanwhile wait about a
    quarter step more (``BatchDecoder``).  ``keep_state(copy, tokens)`` is
    called at each pause point passed (the stable prefix, the end of the
    history).  A ``start`` inside an image (a cache entry that ends there)
    steps back to the image's start, or to nothing for a cache that cannot
    step back.
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
        side: SideThread | None = None,
    ) -> None:
        self._vision, self._request, self._keep_state, self._side = vision, request, keep_state, side
        prompt, images = request.prompt, request.images
        self._end = min(max(image.end for image in images), len(prompt) - 1)  # the batch starts from one token
        inside = next((image for image in images if image.start < start < image.end), None)
        if inside is not None:
            cache, start = (copy_prefix(cache, inside.start), inside.start) if _trimmable(cache) else (new_cache(), 0)
        self.cache, self.position = cache, start
        self._pauses = [point for point in pauses if start < point <= self._end]
        self._span: Any = None
        self._reading: TurnedWork[Any] | None = None  # the images' read on the side thread, while under way
        self._start = start

    @property
    def done(self) -> bool:
        return self.position >= self._end

    def advance(self, tokens: int, seconds: float = float("inf")) -> int:
        """One unit of the work: the images' tower work for up to about ``seconds``, or up to ``tokens`` of
        prefill; returns the tokens prefilled (0 for the tower's work)."""
        if self._span is None:  # the images are not read yet
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

    def close(self) -> None:
        """Let go of an unfinished read (its request stopped): the side thread unwinds it."""
        if self._reading is not None:
            self._reading.abandon()
            self._reading = None

    def _read_images(self, seconds: float) -> None:
        """The images' read (``read_span``) for up to about ``seconds``, on the side thread; in one go without one.

        (One pass over all the new images, as mlx-vlm's own generation
        makes it: the tower's arithmetic differs in its last bits with the
        number of images it reads together.  An agent's session brings its
        images a turn at a time, the earlier ones read from the cache.)
        """
        if self._reading is None:
            request, start = self._request, self.position
            todo = [image for image in request.images if start <= image.start and image.end <= self._end]
            shift = position_shift(request, start)
            read = functools.partial(read_span, self._vision, request.prompt[start : self._end], todo, start + shift)
            if self._side is None:
                self._span = read(Turn())
                return
            self._reading = self._side.begin(read)
        if self._reading.resume(seconds):
            self._span, self._reading = self._reading.result(), None


def read_span(vision: Any, tokens: list[int], images: list[PromptImage], first_position: int, turn: Turn) -> Any:
    """The span's graph built (mlx-vlm's own, its tower's pass in pieces), then the pieces evaluated in order and
    the rest; the turn may pause between any two (before a piece that would end past its deadline).  With the
    turn unlimited (no stream waits for it), what is left is one evaluation (each has its own cost).  The pass
    is made in pieces either way: their split depends only on the images, so an image gives the same
    embeddings whatever else runs."""
    span = vision.span(tokens, images, first_position, turn.pause)
    last = 0.0
    while span.pieces:
        turn.pause(last)
        if turn.unlimited:
            break
        began = time.perf_counter()
        evaluate_piece(span.pieces.pop(0))
        last = time.perf_counter() - began
    turn.pause(last)
    mx.eval(span.arrays())
    span.pieces.clear()
    return span


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
