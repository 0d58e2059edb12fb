"""Each row's rotary positions in mlx-lm's batch: its length plus its images' delta, kept while it is in the batch."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlx_server.mlx_lm_compat import ShiftedKVCache, shifted


def filled(length: int) -> KVCache:
    """One layer of one sequence's cache holding ``length`` tokens."""
    cache = KVCache()
    if length:
        cache.update_and_fetch(mx.zeros((1, 2, length, 4)), mx.zeros((1, 2, length, 4)))
    return cache


def offsets(batch: object) -> list[int]:
    return [int(value) for value in batch.offset.tolist()]  # type: ignore[attr-defined]


def test_rows_join_at_their_length_plus_their_delta() -> None:
    rows = [shifted([filled(10)], -12)[0], shifted([filled(4)], 0)[0], shifted([filled(7)], -3)[0]]
    batch = rows[0].merge(rows)
    assert offsets(batch) == [10 - 12, 4, 7 - 3]


def test_the_deltas_stay_with_their_rows_as_the_batch_decodes_filters_and_extends() -> None:
    batch = ShiftedKVCache.merge(shifted([filled(10)], -12) + shifted([filled(4)], 0))
    batch.update_and_fetch(mx.zeros((2, 2, 1, 4)), mx.zeros((2, 2, 1, 4)))  # one decode step
    assert offsets(batch) == [-1, 5]
    batch.filter([0])
    batch.extend(ShiftedKVCache.merge(shifted([filled(3)], -5)))
    assert offsets(batch) == [-1, -2]


def test_a_rows_state_leaves_the_batch_at_its_true_length() -> None:
    batch = ShiftedKVCache.merge(shifted([filled(10)], -12) + shifted([filled(4)], 0))
    extracted = batch.extract(0)
    assert type(extracted) is KVCache and extracted.offset == 10


def test_shifting_copies_nothing_and_leaves_other_layers_as_they_are() -> None:
    layer, state = filled(5), object()
    shifted_layer, other = shifted([layer, state], -2)
    assert shifted_layer.keys is layer.keys and shifted_layer.offset == 5 and shifted_layer.rope_delta == -2
    assert other is state


def test_a_plain_first_row_would_drop_the_others_deltas() -> None:
    """Why every row of such a model joins shifted: mlx-lm merges by the first row's class."""
    batch = filled(4).merge([filled(4), *shifted([filled(10)], -12)])
    assert offsets(batch) == [4, 10]
