"""A prompt joins a decoding batch in the batch's own next step, not in a forward pass of its own.

mlx-lm's ``BatchGenerator`` runs a finished prompt's last token through the
model alone before it joins, and every stream decoding meanwhile waits for
that pass (about a whole step where the vocabulary's projection is most of
one).  With the server's batches installed (``JoiningGenerationBatch``), the
joining row's last prompt token is fed in the batch's next step beside the
others' tokens; what comes out is token for token what mlx-lm's own joining
gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.sample_utils import greedy_sampler

from mlx_server.mlx_lm_compat import JoiningGenerationBatch

FIRST = [5, 17, 42, 7, 99, 3, 64, 12]
SECOND = [8, 150, 33, 2, 91, 120]


class CountingModel:
    """The model, recording the shape of every forward pass's input."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.passes: list[tuple[int, ...]] = []

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        self.passes.append(tuple(inputs.shape))
        logits: mx.array = self.model(inputs, cache=cache)
        return logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


@dataclass
class Run:
    """What one generator gave: each sequence's tokens and the forward passes from the second's insertion on."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    passes_after_joining: list[tuple[int, ...]] = field(default_factory=list)


def run(model: Any, ours: bool, second_after: int, second_max: int = 6, stop: list[int] | None = None) -> Run:
    """The first prompt decodes alone; the second is inserted once the first has ``second_after`` tokens."""
    counting = CountingModel(model)
    generator = BatchGenerator(counting, completion_batch_size=8, prefill_batch_size=8, prefill_step_size=64)
    if ours:
        JoiningGenerationBatch.install(generator, counting, greedy_sampler)
    (first,) = generator.insert([FIRST], max_tokens=[12])
    result, finished, joined_at = Run(), set[int](), None
    while len(finished) < 2:
        if len(result.tokens.get(first, [])) >= second_after and joined_at is None:
            stops = [StopSequences([stop])] if stop else None
            generator.insert([SECOND], max_tokens=[second_max], stop_sequences=stops)
            joined_at = len(counting.passes)
        for response in generator.next()[1]:
            result.tokens.setdefault(response.uid, []).append(response.token)
            if response.finish_reason is not None:
                finished.add(response.uid)
    result.passes_after_joining = counting.passes[joined_at or 0 :]
    return result


@pytest.mark.parametrize("second_after", [2, 5])
def test_a_prompt_joining_decoding_streams_takes_no_pass_of_its_own(tiny_llama: Any, second_after: int) -> None:
    theirs, ours = run(tiny_llama, False, second_after), run(tiny_llama, True, second_after)
    prefill = (1, len(SECOND) - 1)
    # A decode step, the second prompt's prefill, a decode step; then mlx-lm's pass for the second alone.
    assert theirs.passes_after_joining[:5] == [(1, 1), prefill, (1, 1), (1, 1), (2, 1)]
    assert ours.passes_after_joining[:4] == [(1, 1), prefill, (1, 1), (2, 1)]


@pytest.mark.parametrize("second_after", [0, 2, 5])
def test_every_sequence_gets_the_tokens_mlx_lm_s_own_joining_gives(tiny_llama: Any, second_after: int) -> None:
    """Inserted together (``0``: they join an empty batch, taking their first pass at once) or while decoding."""
    assert run(tiny_llama, True, second_after).tokens == run(tiny_llama, False, second_after).tokens


def test_a_one_token_reply_joining_gets_its_one_token(tiny_llama: Any) -> None:
    ours = run(tiny_llama, True, 3, second_max=1)
    assert ours.tokens == run(tiny_llama, False, 3, second_max=1).tokens
    assert len(ours.tokens[1]) == 1


def test_a_prompt_ending_in_a_stop_sequence_is_not_stopped_by_it(tiny_llama: Any) -> None:
    """The last prompt token goes through the step that feeds it, but only generated tokens are matched."""
    ours = run(tiny_llama, True, 3, stop=[SECOND[-1]])
    assert ours.tokens == run(tiny_llama, False, 3, stop=[SECOND[-1]]).tokens
    assert len(ours.tokens[1]) == 6 or ours.tokens[1][-1] == SECOND[-1]
