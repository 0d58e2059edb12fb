"""One sequence at a time, with mlx-lm's quantized KV cache (``--kv-bits``).

mlx-lm's batch caches cannot hold quantized KV state (``QuantizedKVCache``
has no ``merge``), so with ``--kv-bits`` requests decode one after another
through ``stream_generate``, as mlx_lm.server also does.  Each step does one
piece of the sequence's work (one prefill chunk, or one token), so it stops
at the next step when a plan says so, as a batch does.  The prompt cache
then holds quantized entries: a lease is quantized before use, so that its
checkpoint and what is stored back stay small.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.models.cache import KVCache

from mlx_server.engine.cache_entries import copy_prefix
from mlx_server.engine.constrained import GrammarProcessor, GrammarTokenizer
from mlx_server.engine.image_prefill import prefill_through_images
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.sampling import logits_processors, sampler
from mlx_server.engine.sequence import ActiveSequence, Job
from mlx_server.vocabulary import FinishReason, GrammarError

__all__ = ["KV_GROUP_SIZE", "SequentialDecoder"]

KV_GROUP_SIZE = 64


class _Running:
    """The one sequence being decoded: its KV cache, how far its prefill got, and its generation once started."""

    def __init__(self, sequence: ActiveSequence, cache: list[Any], start: int, pauses: list[int]) -> None:
        self.sequence = sequence
        self.cache = cache
        self.position = start  # prompt tokens in ``cache``
        self.pauses = pauses
        self.grammar: GrammarProcessor | None = None
        self.responses: Generator[GenerationResponse, None, None] | None = None


class SequentialDecoder:
    """Decodes one admitted job at a time, a piece per ``step`` (worker thread only)."""

    def __init__(
        self,
        loaded: Any,
        prompt_cache: KVPromptCache,
        grammar_tokenizer: GrammarTokenizer,
        prefill_step: int,
        kv_bits: int,
    ) -> None:
        self._loaded = loaded
        self._prompt_cache = prompt_cache
        self._grammar_tokenizer = grammar_tokenizer
        self._prefill_step = prefill_step
        self._kv_bits = kv_bits
        self._running: _Running | None = None

    @property
    def active(self) -> int:
        return 0 if self._running is None else 1

    @property
    def decoding(self) -> int:
        return self.active

    def final_lengths(self) -> list[int]:
        return [] if self._running is None else [self._running.sequence.job.final_length]

    def kv_bytes(self) -> int:
        return 0

    def speculation_totals(self) -> tuple[int, int]:
        return 0, 0  # a quantized KV cache decodes without speculation

    def pending_prefixes(self) -> set[str]:
        return set()

    def admit(self, job: Job) -> None:
        """Lease the job's KV state (it is the only one: the scheduler admits one at a time)."""
        sequence = ActiveSequence(job, self._prompt_cache, self._loaded.tokenizer)
        if job.stop is not None:
            sequence.finish(job.stop, None, None)
            return
        request = job.request
        try:
            grammar = GrammarProcessor(self._grammar_tokenizer, request.grammar) if request.grammar else None
        except GrammarError as error:
            sequence.fail(error)
            return
        lease = sequence.lease()
        cache = self._quantized(lease.cache)
        start = lease.cached_tokens
        pauses = sequence.pause_points(lease)
        if request.images:
            cache, start = prefill_through_images(
                self._loaded.vision, cache, request, start, pauses, self._prefill_step,
                sequence.keep_state, lambda: job.leaving, lambda: self._quantized(self._prompt_cache.new_cache()),
            )  # fmt: skip
            pauses = [point for point in pauses if point > start]
        self._running = _Running(sequence, cache, start, pauses)
        self._running.grammar = grammar

    def step(self) -> int:
        """One prefill chunk, or one generated token; returns the tokens generated (0 or 1)."""
        running = self._running
        if running is None:
            return 0
        job, sequence = running.sequence.job, running.sequence
        if job.stop is not None and job.stop != "stop":
            self._finish(job.stop)
            return 0
        prompt = job.prompt
        if running.responses is None:
            end = running.pauses[0] if running.pauses else len(prompt) - 1
            if running.position < end:  # one chunk of the prompt (its last token starts the generation)
                chunk = prompt[running.position : min(end, running.position + self._prefill_step)]
                self._loaded.model(mx.array(chunk)[None], cache=running.cache)
                mx.eval([layer.state for layer in running.cache])
                running.position += len(chunk)
                if running.pauses and running.position == running.pauses[0]:
                    running.pauses.pop(0)
                    sequence.keep_state(copy_prefix(running.cache, running.position), prompt[: running.position])
                return 0
            running.responses = stream_generate(
                self._loaded.model,
                self._loaded.tokenizer,
                mx.array(prompt[running.position :]),
                max_tokens=job.request.max_tokens,
                sampler=sampler(job.request.sampling),
                logits_processors=logits_processors(job.request.sampling, running.grammar),
                prompt_cache=running.cache,
                prefill_step_size=self._prefill_step,
                kv_bits=self._kv_bits,
                kv_group_size=KV_GROUP_SIZE,
                quantized_kv_start=0,
            )
        response = next(running.responses, None)
        if response is None:
            self._finish("stop")
            return 0
        sequence.token(int(response.token), end_of_sequence=response.finish_reason == "stop")
        if sequence.stop_text.matched is not None or job.stop == "stop":
            self._finish("stop")
        elif response.finish_reason is not None:
            self._finish("length" if response.finish_reason == "length" else "stop")
        return 1

    def fail_all(self, error: BaseException) -> None:
        running, self._running = self._running, None
        if running is not None:
            if running.responses is not None:
                running.responses.close()
            running.sequence.fail(error)

    def close(self) -> None:
        self.fail_all(RuntimeError("the engine stopped"))

    def _finish(self, reason: FinishReason) -> None:
        running, self._running = self._running, None
        assert running is not None
        if running.responses is not None:
            running.responses.close()
        held = running.cache[0].offset if hasattr(running.cache[0], "offset") else running.position
        tokens = (running.sequence.job.prompt + running.sequence.generated)[:held]
        running.sequence.finish(reason, running.cache, tokens)

    def _quantized(self, cache: list[Any]) -> list[Any]:
        return [
            layer.to_quantized(group_size=KV_GROUP_SIZE, bits=self._kv_bits) if type(layer) is KVCache else layer
            for layer in cache
        ]
