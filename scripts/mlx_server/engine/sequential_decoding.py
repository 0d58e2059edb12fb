"""One sequence at a time, with mlx-lm's quantized KV cache (``--kv-bits``).

mlx-lm's batch caches cannot hold quantized KV state (``QuantizedKVCache``
has no ``merge``), so with ``--kv-bits`` requests decode one after another
through ``stream_generate``, as mlx_lm.server also does.  The prompt cache
then holds quantized entries: a lease is quantized before use, so that its
checkpoint and what is stored back stay small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.generate import stream_generate
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


class _PrefillInterruptedError(Exception):
    """Raised from mlx-lm's prefill progress callback to stop a cancelled or timed-out prefill between steps."""


class SequentialDecoder:
    """Runs each admitted job to its end in one ``step`` (worker thread only)."""

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
        self._job: Job | None = None

    @property
    def active(self) -> int:
        return 0 if self._job is None else 1

    @property
    def decoding(self) -> int:
        return self.active

    def final_lengths(self) -> list[int]:
        return [] if self._job is None else [self._job.final_length]

    def kv_bytes(self) -> int:
        return 0

    def speculation_totals(self) -> tuple[int, int]:
        return 0, 0  # a quantized KV cache decodes without speculation

    def pending_prefixes(self) -> set[str]:
        return set()

    def admit(self, job: Job) -> None:
        self._job = job

    def step(self) -> int:
        job, self._job = self._job, None
        if job is None:
            return 0
        sequence = ActiveSequence(job, self._prompt_cache, self._loaded.tokenizer)
        try:
            return self._run(job, sequence)
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            sequence.fail(error)
            return 0

    def fail_all(self, error: BaseException) -> None:
        self._job = None

    def close(self) -> None:
        self._job = None

    def _quantized(self, cache: list[Any]) -> list[Any]:
        return [
            layer.to_quantized(group_size=KV_GROUP_SIZE, bits=self._kv_bits) if type(layer) is KVCache else layer
            for layer in cache
        ]

    def _run(self, job: Job, sequence: ActiveSequence) -> int:
        if job.should_stop():
            sequence.finish(job.stop_reason(), None, None)
            return 0
        request = job.request
        try:
            grammar = GrammarProcessor(self._grammar_tokenizer, request.grammar) if request.grammar else None
        except GrammarError as error:
            sequence.fail(error)
            return 0
        lease = sequence.lease()
        cache = self._quantized(lease.cache)
        start = lease.cached_tokens
        pauses = sequence.pause_points(lease)
        if request.images:
            cache, start = prefill_through_images(
                self._loaded.model, self._loaded.vision, cache, request, start, pauses, self._prefill_step,
                sequence.keep_state, job.should_stop, lambda: self._quantized(self._prompt_cache.new_cache()),
            )  # fmt: skip
            pauses = [point for point in pauses if point > start]
        for pause in pauses:
            start += self._prefill(cache, job.prompt[start:pause], job.should_stop)
            if start != pause:
                break
            sequence.keep_state(copy_prefix(cache, pause), job.prompt[:pause])
        if job.should_stop():
            sequence.finish(job.stop_reason(), cache, job.prompt[:start])
            return 0

        def stop_prefill_if_asked(_processed: int, _total: int) -> None:
            if job.should_stop():
                raise _PrefillInterruptedError

        responses = stream_generate(
            self._loaded.model,
            self._loaded.tokenizer,
            mx.array(job.prompt[start:]),
            max_tokens=request.max_tokens,
            sampler=sampler(request.sampling),
            logits_processors=logits_processors(request.sampling, grammar),
            prompt_cache=cache,
            prefill_step_size=self._prefill_step,
            prompt_progress_callback=stop_prefill_if_asked,
            kv_bits=self._kv_bits,
            kv_group_size=KV_GROUP_SIZE,
            quantized_kv_start=0,
        )
        reason: FinishReason = "stop"
        try:
            for response in responses:
                sequence.token(int(response.token), end_of_sequence=response.finish_reason == "stop")
                if sequence.stop_text.matched is not None or job.end_wanted():
                    break
                if response.finish_reason is not None:
                    reason = "length" if response.finish_reason == "length" else "stop"
                    break
                if job.should_stop():
                    reason = job.stop_reason()
                    break
        except _PrefillInterruptedError:
            reason = job.stop_reason()
        finally:
            responses.close()
        held = cache[0].offset if hasattr(cache[0], "offset") else 0
        tokens = (job.prompt + sequence.generated)[:held]
        sequence.finish(reason, cache, tokens)
        return len(sequence.generated)

    def _prefill(self, cache: list[Any], tokens: list[int], should_stop: Callable[[], bool]) -> int:
        """Run ``tokens`` through the model into ``cache``, in steps; returns how many were processed."""
        done = 0
        while done < len(tokens) and not should_stop():
            chunk = tokens[done : done + self._prefill_step]
            self._loaded.model(mx.array(chunk)[None], cache=cache)
            mx.eval([layer.state for layer in cache])
            done += len(chunk)
        return done
