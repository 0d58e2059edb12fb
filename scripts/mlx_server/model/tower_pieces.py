"""A vision tower's pass as pieces to evaluate one at a time, so decoding streams wait for a piece, not the pass.

MLX computes nothing until asked: the graph of the tower's pass is built
whole (mlx-vlm's own ``get_input_embeddings``), and while it is built the
outputs of its attention calls, of its patch embedding and of its blocks are
collected, in the order they are computed.  Evaluating them in that order, a
few between two decode steps, computes the pass in pieces; each piece reuses
what the earlier ones computed.

Some calls are too large to be one piece on a large image: a block of full
attention over its patches (Qwen2.5-VL's ``fullatt_block_indexes``: ~700 ms
over 4,000 patches on this CPU), the patch embedding (a ``Conv3d`` with
every patch a sample of its own: ~170 ms for 4,000 with MLX's CPU
convolution), each block's MLP (~8 ms, most of it the activation), the
rotation of each attention's queries and keys (Qwen-VL's
``apply_rotary_pos_emb_vision``: ~2 ms each) and the patch merger (~6 ms).
Attention's query rows are independent of one another, as are a
convolution's samples, an MLP's tokens, a rotation's rows and a merger's
groups of patches, so while the graph is built, on the thread building it,
each is made a block of rows at a time, each block a piece; the result is
their concatenation, equal to the whole call's to float32 rounding.  The
sizes below make a piece take 1-4 ms on this CPU (a real model on a GPU
makes pieces of the same size, fast; smaller ones here, 8 query rows, gave
longer waits in bench-vision: more of them, each with its own cost).  Once
the graph is built the modules, mlx-vlm's functions and ``mx`` are as they
were.  What is left whole is each attention's projections (queries, keys and
values over all the patches, which every block of rows reads): ~1 ms here.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

__all__ = [
    "ATTENTION_SCORES_PER_PIECE",
    "CONVOLUTION_WORK_PER_PIECE",
    "MLP_WORK_PER_PIECE",
    "ROTARY_VALUES_PER_PIECE",
    "SMALLEST_PIECE",
    "TOWER_BLOCKS",
    "VISION_ROTARY",
    "evaluate_piece",
    "tower_blocks",
    "tower_pieces",
]

#: Where each family's vision tower keeps its blocks (Qwen-VL's ``blocks``; SigLIP's encoder layers).
TOWER_BLOCKS = (("vision_tower", "blocks"), ("vision_tower", "vision_model", "encoder", "layers"))
#: Attention scores (heads x query rows x keys) one piece computes at most.
ATTENTION_SCORES_PER_PIECE = 1 << 17
#: A convolution's work (a sample's inputs x output channels) one piece does at most.
CONVOLUTION_WORK_PER_PIECE = 1 << 22
#: A block's MLP's work (its rows x its weights) one piece does at most.
MLP_WORK_PER_PIECE = 1 << 20
#: Rotated values (rows x heads x head size) one piece computes at most.
ROTARY_VALUES_PER_PIECE = 1 << 16
#: The function Qwen-VL's vision attention rotates its queries and keys with (in each family's module).
VISION_ROTARY = "apply_rotary_pos_emb_vision"
#: Query rows or samples a piece has at least (each piece is a call and an evaluation of its own).
SMALLEST_PIECE = 16

#: How long a build waits for another tower's build at a time before it may pause.
LOCK_TRY_SECONDS = 0.001
#: Held while MLX's attention and convolution are replaced: one tower's graph is built at a time.
_REPLACING_CALLS = threading.Lock()


@contextlib.contextmanager
def tower_pieces(model: nn.Module, pause: Callable[[], None] = lambda: None) -> Iterator[list[mx.array]]:
    """The pieces of the tower's pass whose graph is built inside the block (lazy arrays, in compute order).

    Only the thread that entered sees the split calls; another thread's
    (another model's decode step) go to MLX's own.  ``pause()`` is called
    after each piece is made and while waiting for another tower's build:
    building the graph is itself work that can stop part-way
    (``engine/side_thread.py``).
    """
    pieces = _Pieces(pause)
    with (
        _held(_REPLACING_CALLS, pause),
        _tapped_blocks(model, pieces),
        _mergers_by_rows(model, pieces),
        _on_this_thread(mx.fast, "scaled_dot_product_attention", _by_query_rows, pieces),
        _on_this_thread(mx, "conv3d", _by_samples, pieces),
        contextlib.ExitStack() as rotations,
    ):
        for module in _modules_rotating(model):
            rotations.enter_context(_on_this_thread(module, VISION_ROTARY, _rotation_by_rows, pieces))
        yield pieces


def evaluate_piece(piece: mx.array) -> None:
    """Compute one piece.  A piece made inside a function mlx-vlm compiles (Qwen3-VL's ``ensure_fused_sdpa``)
    is the compiled trace's, with no graph outside it: it is skipped, and the next piece computes its work."""
    try:
        mx.eval(piece)
    except RuntimeError as error:
        if "without a primitive" not in str(error):
            raise


def tower_blocks(model: nn.Module) -> tuple[Any, str]:
    """The module holding the tower's list of blocks, and the list's name (``(None, "")`` if none is found)."""
    for path in TOWER_BLOCKS:
        found: Any = model
        for attribute in path[:-1]:
            found = getattr(found, attribute, None)
        if isinstance(getattr(found, path[-1], None), list):
            return found, path[-1]
    return None, ""


class _Pieces(list[mx.array]):
    """The pieces made so far; the build may pause after each (``tower_pieces``)."""

    def __init__(self, pause: Callable[[], None]) -> None:
        super().__init__()
        self._pause = pause

    def made(self, parts: Iterable[mx.array]) -> list[mx.array]:
        """``parts`` (made as they are taken), each a piece; returned as a list."""
        taken = []
        for part in parts:
            self.append(part)
            taken.append(part)
        return taken

    def append(self, piece: mx.array) -> None:
        super().append(piece)
        self._pause()


@contextlib.contextmanager
def _held(lock: threading.Lock, pause: Callable[[], None]) -> Iterator[None]:
    """``lock`` held inside the block; while another thread holds it, ``pause()`` between tries."""
    while not lock.acquire(timeout=LOCK_TRY_SECONDS):
        pause()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _tapped_blocks(model: nn.Module, pieces: _Pieces) -> Iterator[None]:
    """Each tower block's output joins ``pieces`` as the graph is built, and its MLP is applied a block of rows
    at a time (each a piece: an MLP reads each token alone); the modules are as loaded afterwards."""
    owner, name = tower_blocks(model)
    if owner is None:
        yield
        return
    blocks = getattr(owner, name)

    def tap(block: Any) -> Callable[..., Any]:
        def run(*arguments: Any, **keywords: Any) -> Any:
            output = block(*arguments, **keywords)
            pieces.append(output[0] if isinstance(output, tuple) else output)
            return output

        return run

    mlps = {index: block["mlp"] for index, block in enumerate(blocks) if isinstance(block.get("mlp"), nn.Module)}
    for index, mlp in mlps.items():
        blocks[index]["mlp"] = _by_rows(mlp, pieces)  # a module's dict entry is what its attribute reads
    setattr(owner, name, [tap(block) for block in blocks])
    try:
        yield
    finally:
        setattr(owner, name, blocks)
        for index, mlp in mlps.items():
            blocks[index]["mlp"] = mlp


@contextlib.contextmanager
def _mergers_by_rows(model: nn.Module, pieces: _Pieces) -> Iterator[None]:
    """Qwen-VL's patch mergers (the tower's ``merger`` and Qwen3-VL's ``deepstack_merger_list``) applied a
    block of patch groups at a time, each a piece; the modules are as loaded afterwards."""
    tower = getattr(model, "vision_tower", None)
    found: list[tuple[Any, Any, nn.Module]] = []  # (holder, key, merger)
    if isinstance(tower, nn.Module):
        if isinstance(tower.get("merger"), nn.Module):
            found.append((tower, "merger", tower["merger"]))
        deepstack = tower.get("deepstack_merger_list")
        if isinstance(deepstack, list):
            found += [(deepstack, index, merger) for index, merger in enumerate(deepstack)]
    for holder, key, merger in found:
        holder[key] = _by_rows(merger, pieces, merging=True)
    try:
        yield
    finally:
        for holder, key, merger in found:
            holder[key] = merger


def _by_rows(module: nn.Module, pieces: _Pieces, merging: bool = False) -> Callable[[mx.array], mx.array]:
    """A per-token module applied a block of tokens (the second-to-last axis) at a time, each block a piece.

    A merger (``merging``) reads its ``hidden_size`` as that many consecutive rows' values: its blocks
    hold whole groups of rows.
    """
    weights: dict[str, mx.array] = dict(tree_flatten(module.parameters()))
    per_output = max(1, sum(value.size for value in weights.values()))
    outputs = max(SMALLEST_PIECE, MLP_WORK_PER_PIECE // per_output)

    def by_rows(inputs: mx.array) -> mx.array:
        length, width = inputs.shape[-2], inputs.shape[-1]
        group = max(1, getattr(module, "hidden_size", width) // width) if merging else 1
        rows = outputs * group
        if length <= rows or length % group:
            whole: mx.array = module(inputs)
            return whole
        parts = pieces.made(module(inputs[..., begin : begin + rows, :]) for begin in range(0, length, rows))
        return mx.concatenate(parts, axis=-2)

    return by_rows


def _modules_rotating(model: nn.Module) -> list[Any]:
    """The mlx-vlm modules whose vision attention rotates with a module-level ``VISION_ROTARY`` (Qwen-VL)."""
    tower = getattr(model, "vision_tower", None)
    if not isinstance(tower, nn.Module):
        return []
    names = {type(module).__module__ for _, module in tower.named_modules()}
    return [sys.modules[name] for name in sorted(names) if hasattr(sys.modules.get(name), VISION_ROTARY)]


def _rotation_by_rows(rotate: Callable[..., mx.array], pieces: _Pieces) -> Callable[..., mx.array]:
    """Queries or keys (``(..., rows, heads, head size)``) rotated by their rows' angles a block of rows at a
    time, each block a piece: a row's rotation reads that row alone."""

    def by_rows(values: mx.array, angles: mx.array) -> mx.array:
        length = angles.shape[0]
        rows = max(SMALLEST_PIECE, ROTARY_VALUES_PER_PIECE // max(1, values.shape[-2] * values.shape[-1]))
        if angles.ndim != 2 or values.ndim < 3 or values.shape[-3] != length or length <= rows:
            return rotate(values, angles)
        parts = pieces.made(rotate(values[..., begin : begin + rows, :, :], angles[begin : begin + rows])
                            for begin in range(0, length, rows))  # fmt: skip
        return mx.concatenate(parts, axis=-3)

    return by_rows


@contextlib.contextmanager
def _on_this_thread(
    owner: Any, name: str, split: Callable[[Callable[..., mx.array], _Pieces], Callable[..., mx.array]],
    pieces: _Pieces,
) -> Iterator[None]:  # fmt: skip
    """``owner.name`` made in pieces by ``split`` on this thread while the block runs; as it was elsewhere."""
    original = getattr(owner, name)
    in_pieces, builder = split(original, pieces), threading.get_ident()

    def call(*arguments: Any, **keywords: Any) -> mx.array:
        return (in_pieces if threading.get_ident() == builder else original)(*arguments, **keywords)

    setattr(owner, name, call)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _by_query_rows(attention: Callable[..., mx.array], pieces: _Pieces) -> Callable[..., mx.array]:
    """Scaled dot-product attention a block of query rows at a time, each block a piece."""

    def by_rows(queries: mx.array, keys: mx.array, values: mx.array, **options: Any) -> mx.array:
        mask, length = options.get("mask"), queries.shape[-2]
        scores_per_row = queries.shape[0] * queries.shape[1] * keys.shape[-2]
        rows = max(SMALLEST_PIECE, ATTENTION_SCORES_PER_PIECE // max(1, scores_per_row))
        if length <= rows or set(options) - {"scale", "mask"} or not _rows_apart(mask, length):
            pieces.append(attention(queries, keys, values, **options))
            return pieces[-1]

        def rows_from(begin: int) -> mx.array:
            part_mask = mask[..., begin : begin + rows, :] if mask is not None and mask.shape[-2] > 1 else mask
            return attention(queries[..., begin : begin + rows, :], keys, values, **{**options, "mask": part_mask})

        parts = pieces.made(rows_from(begin) for begin in range(0, length, rows))
        return mx.concatenate(parts, axis=-2)

    return by_rows


def _by_samples(convolution: Callable[..., mx.array], pieces: _Pieces) -> Callable[..., mx.array]:
    """A convolution a block of samples (its first axis) at a time, each block a piece."""

    def by_samples(inputs: mx.array, weight: mx.array, *arguments: Any, **options: Any) -> mx.array:
        per_sample = max(1, inputs[0].size * weight.shape[0])
        samples = max(SMALLEST_PIECE, CONVOLUTION_WORK_PER_PIECE // per_sample)
        parts = pieces.made(convolution(inputs[begin : begin + samples], weight, *arguments, **options)
                            for begin in range(0, inputs.shape[0], samples))  # fmt: skip
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

    return by_samples


def _rows_apart(mask: Any, length: int) -> bool:
    """Whether a block of query rows can take its rows of ``mask`` (none, or an array with a row per query or one)."""
    return mask is None or (isinstance(mask, mx.array) and mask.ndim >= 2 and mask.shape[-2] in (1, length))
