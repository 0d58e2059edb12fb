"""Per-request sampling for a batch: mlx-lm's samplers and logits processors, one set per sequence.

mlx-lm's ``make_sampler`` draws from MLX's global random state, which every
sequence of a batch shares, so a seeded request could not give the same
output alone and in a batch.  A seeded request therefore gets its own PRNG
key, split at every step, over the same filters mlx-lm applies (top-p, min-p,
top-k, in mlx-lm's order); unseeded and greedy requests use mlx-lm's samplers
as they are (all greedy rows share one sampler, so the batch samples them in
one call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from mlx_server.vocabulary import Sampling

__all__ = ["LogitsProcessor", "Sampler", "logits_processors", "sampler"]

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def sampler(sampling: Sampling) -> Sampler:
    """The sampler for one request's resolved sampling; requests with the same unseeded settings share one."""
    temperature = Sampling.require(sampling.temperature)
    top_p, min_p, top_k = Sampling.require(sampling.top_p), Sampling.require(sampling.min_p), sampling.top_k or 0
    if temperature == 0:
        return greedy_sampler
    if sampling.seed is None:
        return _shared_sampler(temperature, top_p, min_p, top_k)
    return _SeededSampler(temperature, top_p, min_p, top_k, sampling.seed)


def _make_shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int) -> Sampler:
    """mlx-lm's sampler for these settings, made once (it draws from MLX's global random state, so it is stateless)."""
    made: Sampler = make_sampler(temperature, top_p, min_p, top_k=top_k)
    return made


_shared_sampler = functools.lru_cache(maxsize=64)(_make_shared_sampler)


class _SeededSampler:
    """mlx-lm's filters, then a categorical draw with this request's own key (split every step)."""

    def __init__(self, temperature: float, top_p: float, min_p: float, top_k: int, seed: int) -> None:
        self._key = mx.random.key(seed % 2**64)
        self._scale = 1 / temperature
        self._filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1.0:
            self._filters.append(lambda logprobs: apply_top_p(logprobs, top_p))
        if min_p != 0.0:
            self._filters.append(lambda logprobs: apply_min_p(logprobs, min_p))
        if top_k > 0:
            self._filters.append(lambda logprobs: apply_top_k(logprobs, top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        keys = mx.random.split(self._key)
        self._key, draw = keys[0], keys[1]
        for apply in self._filters:
            logprobs = apply(logprobs)
        return mx.random.categorical(logprobs * self._scale, key=draw)


def logits_processors(sampling: Sampling, grammar: Any | None = None) -> list[LogitsProcessor]:
    """mlx-lm's penalties, then the grammar's mask (last, so that nothing can re-allow a masked token).

    A repetition penalty of 1 changes nothing and is left out: a row without
    processors costs the batch nothing per step.
    """
    repetition = sampling.repetition_penalty
    processors: list[LogitsProcessor] = make_logits_processors(
        repetition_penalty=None if repetition == 1.0 else repetition,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
    )
    if grammar is not None:
        processors.append(grammar)
    return processors
