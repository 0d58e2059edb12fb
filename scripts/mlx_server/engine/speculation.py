"""Prompt-lookup speculative decoding inside mlx-lm's generation batch.

A coding agent's output copies its context (an edit's ``old_string`` from a
file it read, a file rewritten with one line changed, paths and names).  For
such a sequence the next tokens can be guessed by finding the latest n-gram of
its context (prompt and output so far) earlier in that context and drafting
the tokens that followed it there (``PromptLookup``).  One forward pass over
the pending token and the draft gives the model's distribution at every
drafted position; the tokens are then sampled position by position exactly
as plain decoding would sample them, and a draft token is kept while it
equals the sampled one.  The first difference ends the run: the sampled
token there is the next token, and the KV cache is trimmed past the
rejected drafts.  So the output is the output of plain decoding, token for
token: greedy trivially, and sampled too, since the sampler draws the same
value for a position however many positions a pass covers (a draft is a
single token, so keeping it when the sample equals it is the standard
acceptance rule).  Logits processors (penalties, the grammar's mask) see
only kept tokens, in order, so a grammar never consumes a rejected draft.

Where it runs: a sequence decoding alone in the batch, on caches that can be
trimmed (``KVCache``; a sliding window or a recurrent state cannot step back
over a rejected draft).  A batch of several rows already fills each pass, so
verification would widen every row's step for a minority's benefit; the
measured rule is in bench/README.md.  How much to draft adapts to each
sequence's recent acceptance (``Acceptance``): text that does not repeat
stops drafting after a few misses and tries again less and less often.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache
from numpy.lib.stride_tricks import sliding_window_view

from mlx_server.mlx_lm_compat import JoiningGenerationBatch

__all__ = ["Acceptance", "PromptLookup", "SpeculativeGenerationBatch"]

MAX_NGRAM, MIN_NGRAM = 4, 2
FIRST_DRAFT, MAX_DRAFT = 6, 12
MISSES_BEFORE_BACKING_OFF = 2
LONGEST_BACKOFF = 64


class PromptLookup:
    """Drafts from the context itself: what followed the latest earlier occurrence of its final n-gram."""

    def draft(self, context: np.ndarray, count: int) -> list[int]:
        """Up to ``count`` tokens that followed the longest (``MAX_NGRAM`` .. ``MIN_NGRAM``) suffix earlier on."""
        length = len(context)
        for size in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if length <= size:
                continue
            windows = sliding_window_view(context[:-1], size)
            found = np.flatnonzero((windows == context[-size:]).all(axis=1))
            if len(found):
                start = int(found[-1]) + size
                return [int(token) for token in context[start : start + count]]
        return []


@dataclass
class Acceptance:
    """One sequence's drafting: how many tokens to draft next, after how it went."""

    size: int = FIRST_DRAFT
    misses: int = 0
    wait: int = 0  # steps to skip before drafting again
    backoff: int = 1
    drafted: int = 0
    accepted: int = 0

    def draft_size(self) -> int:
        """Tokens to draft this step (0: decode plainly)."""
        if self.wait > 0:
            self.wait -= 1
            return 0
        return self.size

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.size = min(MAX_DRAFT, self.size * 2)
        else:
            self.size = max(MIN_NGRAM, accepted + 1)
        if accepted:
            self.misses, self.backoff = 0, 1
            return
        self.misses += 1
        if self.misses >= MISSES_BEFORE_BACKING_OFF:
            self.wait, self.backoff = self.backoff, min(LONGEST_BACKOFF, self.backoff * 2)
            self.misses = 0

    def no_draft_found(self) -> None:
        """The context had nothing to copy: wait a little before looking again (costs a search per step)."""
        self.wait = min(self.backoff, 4)


class SpeculativeGenerationBatch(JoiningGenerationBatch):
    """mlx-lm's generation batch, with prompt-lookup speculation for a sequence that decodes alone.

    ``BatchGenerator`` keeps one generation batch and extends it as prompts
    finish prefilling; ``install`` puts this one in its place.
    """

    lookup = PromptLookup()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acceptance: dict[int, Acceptance] = {}
        super().__init__(*args, **kwargs)

    def take_counts(self, uid: int) -> tuple[int, int]:
        """(drafted, accepted) for a sequence that is leaving, forgetting it."""
        acceptance = self._acceptance.pop(uid, None)
        return (acceptance.drafted, acceptance.accepted) if acceptance else (0, 0)

    def speculate(self) -> list[GenerationBatch.Response] | None:
        pending_token = self.pending_token()
        if len(self.uids) != 1 or pending_token is None or not self._trimmable():
            return None
        acceptance = self._acceptance.setdefault(self.uids[0], Acceptance())
        size = acceptance.draft_size()
        if size == 0:
            return None
        pending = _scalar(pending_token)
        context = np.fromiter((*self.tokens[0], pending), dtype=np.int64, count=len(self.tokens[0]) + 1)
        draft = self.lookup.draft(context, min(size, self.max_tokens[0] - self.generated_tokens(0) - 1))
        if not draft:
            acceptance.no_draft_found()
            return None
        return self._verify(pending, draft, acceptance)

    def _trimmable(self) -> bool:
        return all(type(layer) is BatchKVCache for layer in self.prompt_cache)

    def _verify(self, pending: int, draft: list[int], acceptance: Acceptance) -> list[GenerationBatch.Response]:
        """One pass over the pending token and the draft; keep what the sampler agrees with (see the module)."""
        fed = [pending, *draft]
        logits = self.model(mx.array([fed]), cache=self.prompt_cache)[0]
        processors = (self.logits_processors[0] if self.logits_processors else None) or ()
        sampler = (self.samplers[0] if self.samplers else None) or self.fallback_sampler
        kept, kept_logprobs = [pending], [self.pending_logprobs(0)]
        for position, token in enumerate(fed):
            row = logits[position : position + 1]
            if processors:
                context = self.processing_context(0, token)
                for processor in processors:
                    row = processor(context, row)
            logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
            sampled = sampler(logprobs)
            mx.eval(sampled, logprobs)
            value = _scalar(sampled)
            if position < len(draft) and value == draft[position]:
                kept.append(value)
                kept_logprobs.append(logprobs[0])
                continue
            next_token, next_logprobs = sampled, logprobs[0]
            break
        accepted = len(kept) - 1
        acceptance.record(len(draft), accepted)
        self._trim(len(draft) - accepted)
        self.set_pending(next_token, next_logprobs)
        return self._respond(kept, kept_logprobs)

    def _trim(self, count: int) -> None:
        if count:
            for layer in self.prompt_cache:
                layer.trim(count)

    def _respond(self, tokens: list[int], logprobs: list[mx.array]) -> list[GenerationBatch.Response]:
        """A response per kept token, as plain decoding gives them; the first to finish the sequence ends it."""
        responses = []
        for index, (token, token_logprobs) in enumerate(zip(tokens, logprobs)):
            stopped = self.keep_token(0, token)
            finish = "stop" if stopped else "length" if self.generated_tokens(0) >= self.max_tokens[0] else None
            if finish is None:
                responses.append(self.Response(self.uids[0], token, token_logprobs, None, None, None))
                continue
            self._trim(len(tokens) - 1 - index)  # the cache holds what was kept, up to this token
            responses.append(self.Response(self.uids[0], token, token_logprobs, finish, self.extract_cache(0),
                                           self.tokens[0]))  # fmt: skip
            self.filter([])
            break
        return responses


def _scalar(token: mx.array) -> int:
    """The one token id in ``token`` (a scalar or a one-element array)."""
    values: Any = token.reshape(-1).tolist()
    return int(values[0])
