"""Vision models through mlx-vlm: its processor reads an image, its vision tower turns it into embeddings.

The language model stays mlx-lm's own class (mlx-lm loads a vision model's
checkpoint as its text model), so the continuous batch, the prompt cache and
the grammars treat a vision model as any other; mlx-vlm's model shares those
weights (its language model's arrays are replaced by mlx-lm's before any is
read) and adds only its vision tower and projector.  An image's part of a
prompt is prefilled with the embeddings mlx-vlm computes for it
(``VisionTower.span``), on the engine's worker thread.

Gemma 3 places image tokens at ordinary positions.  The Qwen-VL families
place them on a 3-D grid (M-RoPE) that takes fewer positions than tokens, so
an image's span is prefilled by mlx-vlm's own language model with the 3-D
position ids it computes, and the text after it sits at its index plus the
images' ``rope_delta`` (``mlx_lm_compat.ShiftedKVCache`` keeps that per row
in the batch).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_server.model.tower_pieces import tower_pieces
from mlx_server.vocabulary import InvalidRequestError, PromptImage, ReadImage

__all__ = [
    "IMAGE_FAMILIES",
    "INSTALL_VISION",
    "POSITION_GRID_FAMILIES",
    "ImageSpan",
    "VisionTower",
    "VisionUnavailableError",
    "images_left_out",
    "load_vision",
    "open_image",
]

logger = logging.getLogger("mlx")

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
#: The families whose images take M-RoPE's 3-D positions (the text after an image sits at a per-row delta).
POSITION_GRID_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"})
#: What the chat template gets for one image, by model type (the processor expands it to the image's tokens).
IMAGE_FAMILIES = {"gemma3": "<start_of_image>", **{family: QWEN_IMAGE for family in POSITION_GRID_FAMILIES}}
INSTALL_VISION = "make install-vision (or: pip install -e '.[vision]')"
IMAGES_REMEMBERED = 32
REMEMBERED_PIXEL_BYTES = 256 * 1024**2  # what the remembered images' pixels may hold, in all
#: The image formats decoded (what screenshots and photos come in); others, EPS (Ghostscript) among them, are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class VisionUnavailableError(RuntimeError):
    """The model reads images, and what reads them (the vision extra) is not installed."""


def images_left_out(config: dict[str, Any], name: str) -> str | None:
    """What start-up says of a vision checkpoint whose family's images are not read here (mlx-lm serves its
    language model as text); None for a text model and for the families read."""
    family = _vision_checkpoint(config)
    if family is None or family in IMAGE_FAMILIES:
        return None
    return (f"{name} is a vision model ({family}) served as a text model, images left out: this server reads "
            f"the images of {', '.join(sorted(IMAGE_FAMILIES))}")  # fmt: skip


def _vision_checkpoint(config: dict[str, Any]) -> str | None:
    """The model type, when the checkpoint is a vision model's (it has a vision tower's config)."""
    return str(config.get("model_type", "")) if config.get("vision_config") is not None else None


class ImageSpan:
    """A slice of a prompt holding images, as the language model reads it; prefilled in chunks by ``prefill``.

    ``embeddings`` are the input embeddings of the slice's tokens (the
    images' from the vision tower); where the model places images on a grid,
    ``positions`` are the slice's M-RoPE position ids (3, 1, L) and ``visual``
    and ``deepstack`` the image tokens' mask and the tower's features that
    Qwen3-VL adds to its first layers.  All of it is lazy until evaluated:
    ``pieces`` are the tower's pass, in order (``tower_pieces``).
    """

    def __init__(
        self, forward: Callable[..., Any], tokens: Sequence[int], features: Any, grid: bool,
        pieces: list[mx.array] | None = None,
    ) -> None:  # fmt: skip
        self._forward = forward
        self._tokens = list(tokens)
        self.pieces = list(pieces or [])  # the tower's pass in pieces, evaluated in order before the rest
        self.embeddings: mx.array = features.inputs_embeds
        self.positions: mx.array | None = features.position_ids if grid else None
        self.visual: mx.array | None = getattr(features, "visual_pos_masks", None) if grid else None
        self.deepstack: Any = getattr(features, "deepstack_visual_embeds", None) if grid else None
        marks = [bool(mark) for mark in self.visual.tolist()[0]] if self.visual is not None else []
        self._visual_before = list(itertools.accumulate(marks, initial=0))  # image tokens before each index

    def arrays(self) -> list[mx.array]:
        """What ``prefill`` reads: evaluated on the thread that built them (MLX's streams are per thread)."""
        kept = [self.embeddings, *(array for array in (self.positions, self.visual) if array is not None)]
        return kept + list(self.deepstack or [])

    def prefill(self, begin: int, end: int, cache: list[Any]) -> None:
        """Run tokens ``begin:end`` of the slice through the language model into ``cache``."""
        ids = mx.array(self._tokens[begin:end])[None]
        chunk = self.embeddings[:, begin:end]
        if self.positions is None:
            self._forward(ids, cache=cache, input_embeddings=chunk)
            return
        extra: dict[str, Any] = {}
        if self.visual is not None and self.deepstack is not None:
            before, through = self._visual_before[begin], self._visual_before[end]
            if through > before:
                extra = {"visual_pos_masks": self.visual[:, begin:end],
                         "deepstack_visual_embeds": [layer[before:through] for layer in self.deepstack]}  # fmt: skip
        theirs = _as_mlx_vlm_caches(cache)
        self._forward(ids, inputs_embeds=chunk, cache=theirs, position_ids=self.positions[..., begin:end], **extra)
        for ours, their in zip(cache, theirs, strict=True):
            if hasattr(ours, "keys"):
                ours.keys, ours.values, ours.offset = their.keys, their.values, their.offset
            else:
                ours.cache = their.cache


def _as_mlx_vlm_caches(cache: list[Any]) -> list[Any]:
    """mlx-vlm's cache classes over the same arrays as mlx-lm's: its language models call their own cache API
    (Qwen3.5's linear attention keeps its window through ``ArraysCache.update_window``)."""
    from mlx_vlm.models.cache import ArraysCache, KVCache

    theirs: list[Any] = []
    for layer in cache:
        if hasattr(layer, "keys"):
            their = KVCache()
            their.keys, their.values, their.offset = layer.keys, layer.values, layer.offset
        else:
            their = ArraysCache(len(layer.cache))
            their.cache = list(layer.cache)
        theirs.append(their)
    return theirs


class VisionTower:
    """A vision model's image side: the processor (on request threads) and the tower (on the worker)."""

    def __init__(self, model: nn.Module, processor: Any, family: str, text_model: nn.Module) -> None:
        self._model = model
        self._text_model = text_model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self.family = family
        self._read: OrderedDict[bytes, ReadImage] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def marker(self) -> str:
        return IMAGE_FAMILIES[self.family]

    @property
    def positions_on_grid(self) -> bool:
        """Whether images take M-RoPE's 3-D positions (the batch then keeps each row's ``rope_delta``)."""
        return self.family in POSITION_GRID_FAMILIES

    @property
    def weights_bytes(self) -> int:
        """What the vision tower and projector add to the language model's weights."""
        return sum(int(value.nbytes) for value in _image_side(self._model))

    def read(self, data: bytes, max_pixels: int) -> ReadImage:
        """The image's tokens and pixels, from the model's own processor; remembered by content.

        An agent's session sends the same screenshot with every later turn, so
        it is decoded and resized once.  Only PNG, JPEG, WEBP and GIF are
        decoded, and only when the header declares at most ``max_pixels``
        pixels: anything else, and anything Pillow or the processor raises, is
        an InvalidRequestError.
        """
        digest = hashlib.sha256(data).digest()
        with self._lock:
            if digest in self._read:
                self._read.move_to_end(digest)
                return self._read[digest]
        read = self._process(data, digest, max_pixels)
        with self._lock:
            self._read[digest] = read
            while len(self._read) > IMAGES_REMEMBERED or (
                len(self._read) > 1 and sum(_pixel_bytes(kept) for kept in self._read.values()) > REMEMBERED_PIXEL_BYTES
            ):
                self._read.popitem(last=False)
        return read

    def _process(self, data: bytes, digest: bytes, max_pixels: int) -> ReadImage:
        image = open_image(data, max_pixels)
        try:
            inputs = self._processor(text=[self.marker], images=[image], add_special_tokens=False)
        except Exception as error:  # the processor raises many kinds; each is the client's sentence
            raise _unreadable(error) from error
        tokens = [int(token) for token in inputs["input_ids"].tolist()[0]]
        text = str(self._tokenizer.decode(tokens))
        while tokens and not str(self._tokenizer.decode(tokens[:1])).strip():
            tokens = tokens[1:]  # whitespace merges with the text before the image
        while tokens and not str(self._tokenizer.decode(tokens[-1:])).strip():
            tokens = tokens[:-1]
        grid = inputs.get("image_grid_thw") if self.positions_on_grid else None
        delta = self._rope_delta(grid) if grid is not None else 0
        return ReadImage(text, tuple(tokens), digest, inputs["pixel_values"], grid, delta)

    def _rope_delta(self, grid: Any) -> int:
        """Positions minus tokens of one image on M-RoPE's grid: its t x h x w merged patches take max(t, h, w).

        (mlx-vlm's ``get_rope_index`` places them so; tests/families hold the two equal.)
        """
        merge = int(self._model.config.vision_config.spatial_merge_size)
        frames, height, width = (int(side) for side in grid.tolist()[0])
        height, width = height // merge, width // merge
        return max(frames, height, width) - frames * height * width

    def span(
        self, tokens: Sequence[int], images: Sequence[PromptImage], first_position: int,
        pause: Callable[[], None] = lambda: None,
    ) -> ImageSpan:  # fmt: skip
        """``tokens`` (a slice of a prompt holding exactly ``images``) as the language model reads them;
        ``first_position`` is where the slice's first token sits (its index plus the delta of the images before
        it).  Building the graph may stop part-way at each ``pause()`` (``tower_pieces``)."""
        ids = mx.array(list(tokens))[None]
        pixels = mx.concatenate([mx.array(image.image.pixels) for image in images], axis=0) if images else None
        with tower_pieces(self._model, pause) as pieces:
            if not self.positions_on_grid:
                features = self._model.get_input_embeddings(ids, pixels, mask=mx.ones_like(ids))
                return ImageSpan(self._text_model, tokens, features, grid=False, pieces=pieces)
            grid = mx.concatenate([mx.array(image.image.grid) for image in images], axis=0) if images else None
            features = self._model.get_input_embeddings(ids, pixels, image_grid_thw=grid, mask=mx.ones_like(ids))
        features.position_ids = features.position_ids + first_position
        return ImageSpan(self._model.language_model.model, tokens, features, grid=True, pieces=pieces)


def open_image(data: bytes, max_pixels: int) -> Any:
    """The image as RGB pixels (a Pillow image), decoded only when it is a PNG, JPEG, WEBP or GIF whose header
    declares at most ``max_pixels`` pixels; an InvalidRequestError otherwise, whatever Pillow would raise."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"an image of {width}x{height} pixels is larger than this server reads ({max_pixels} pixels, "
                    "--max-image-pixels): send it scaled down",
                    "messages",
                    "image_too_large",
                )
            return opened.convert("RGB")
    except InvalidRequestError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own bound, past ours: refused from the header too
        raise InvalidRequestError(
            f"an image is larger than this server reads ({max_pixels} pixels, --max-image-pixels): {error}",
            "messages",
            "image_too_large",
        ) from error
    except Exception as error:  # Pillow raises many kinds (DecompressionBombError among them); each is a 400
        raise _unreadable(error) from error


def _unreadable(error: Exception) -> InvalidRequestError:
    return InvalidRequestError(
        f"an image could not be read ({type(error).__name__}: {str(error)[:200]}); send a PNG, JPEG, WEBP or GIF",
        "messages",
        "invalid_image",
    )


def _pixel_bytes(read: ReadImage) -> int:
    return int(getattr(read.pixels, "nbytes", 0))


def load_vision(directory: Path, text_model: nn.Module, config: dict[str, Any]) -> VisionTower | None:
    """The vision side of a vision model whose images this server reads; None for a text model.

    VisionUnavailableError when the model reads images and mlx-vlm is not installed.
    """
    family = _vision_checkpoint(config)
    if family is None or family not in IMAGE_FAMILIES:
        return None
    try:
        from mlx_vlm.utils import load_image_processor, load_model, load_processor
    except ImportError as error:
        raise VisionUnavailableError(
            f"{directory.name} is a vision model ({family}); reading images needs the vision extra: {INSTALL_VISION}"
        ) from error
    model = load_model(directory, lazy=True)
    _share_language_model(model, text_model)
    mx.eval(_image_side(model))
    processor = load_processor(directory, True, eos_token_ids=config.get("eos_token_id"))
    image_processor = load_image_processor(directory)
    if image_processor is not None:
        processor.image_processor = image_processor
    return VisionTower(model, processor, family, text_model)


def _image_side(model: nn.Module) -> list[mx.array]:
    """The vision tower's and projector's arrays: everything but the language model."""
    arrays: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    return [value for name, value in arrays.items() if not name.startswith("language_model.")]


def _share_language_model(vision_model: nn.Module, text_model: nn.Module) -> None:
    """Point mlx-vlm's language model at mlx-lm's arrays, so the weights are in memory once.

    Arrays whose names or shapes differ stay mlx-vlm's own (loaded lazily: only what the vision path reads).
    """
    theirs = dict(tree_flatten(vision_model.language_model.parameters()))
    ours = dict(tree_flatten(text_model.language_model.parameters()))
    shared = [(name, ours[name]) for name, value in theirs.items() if name in ours and ours[name].shape == value.shape]
    vision_model.language_model.update(tree_unflatten(shared))
    if len(shared) != len(theirs):
        logger.debug("Vision model: %d of %d language-model arrays shared", len(shared), len(theirs))
