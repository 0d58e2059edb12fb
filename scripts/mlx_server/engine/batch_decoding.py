"""Continuous batching on mlx-lm's ``BatchGenerator``: sequences join between decode steps and leave when done.

mlx-lm does the batching itself: batch KV caches that merge sequences of
different lengths, one prefill chunk (``prefill_step`` tokens per prompt,
``prefill_batch`` prompts together) interleaved with every decode step, per
sequence samplers, logits processors, token stop sequences and length limits,
and prompt segments that pause the prefill at a boundary.  What it lacks, and
this module adds:

* the prompt cache: a sequence starts from its leased prefix (``caches`` and
  ``all_tokens`` at insert) and its KV state is stored back when it ends, by
  the generator (``prompt_cache`` of a finished response) or extracted when
  this module removes it;
* KV state kept on the way: the prompt is inserted in segments that pause
  at the stable prefix (a checkpoint, as mlx-lm's server keeps) and, for a
  cache that cannot step back, at the end of the history (the snapshot the
  next turn resumes from);
* a vision model's images, prefilled with the vision tower's embeddings
  before the rest of the prompt joins (``image_prefill``), and for M-RoPE
  models each row's position delta (``mlx_lm_compat.shifted``);
* a prompt joining decoding streams without a forward pass of its own: its
  last token goes through the batch's next step (``mlx_lm_compat.JoiningGenerationBatch``);
* prompt-lookup speculation for a sequence decoding alone (``speculation``);
* everything a request needs that is text, not tokens: detokenizing, stop
  strings (the sequence leaves the batch when one matches), cancellation and
  deadlines checked at every step, stats and delivery (``sequence.ActiveSequence``).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.sample_utils import greedy_sampler

from mlx_server.engine.constrained import GrammarProcessor, GrammarTokenizer
from mlx_server.engine.image_prefill import ImagePrefill, position_shift
from mlx_server.engine.prompt_cache import KVPromptCache
from mlx_server.engine.sampling import logits_processors, sampler
from mlx_server.engine.sequence import ActiveSequence, Job
from mlx_server.engine.side_thread import SideThread
from mlx_server.engine.speculation import SpeculativeGenerationBatch
from mlx_server.mlx_lm_compat import JoiningGenerationBatch, prompt_queue_lengths, shifted
from mlx_server.vocabulary import FinishReason, GrammarError, SpeculativeMode

__all__ = ["BatchDecoder"]

logger = logging.getLogger("mlx")

FIRST_DECODE_STEP_SECONDS = 0.02  # until measured
STEPS_MEASURED = 32  # a decode step's time (s): the median of the last this many (a slow one is not the rule)
UNIT_SHARE_OF_STEP = 0.25  # an image's unit of prefill against a decode step (measured: 0.5 gave longer waits)
MIN_IMAGE_CHUNK = 4  # tokens: an image's prefill goes on, however slow a token is (16 took 2x a unit on Gemma 3)
CHUNK_SLACK = 0.25  # an image chunk within a quarter of its time keeps its size
CHUNK_GROWTH = 2.0  # at most doubled at a time


@dataclass
class _Reading:
    """An admitted sequence whose images are being prefilled, a unit per step, before it joins the batch."""

    sequence: ActiveSequence
    grammar: GrammarProcessor | None
    pauses: list[int]
    work: ImagePrefill


class BatchDecoder:
    """The sequences decoding together (worker thread only)."""

    def __init__(
        self,
        loaded: Any,
        prompt_cache: KVPromptCache,
        grammar_tokenizer: GrammarTokenizer,
        max_batch: int,
        prefill_step: int,
        prefill_batch: int,
        speculative: SpeculativeMode = "off",
    ) -> None:
        self._tokenizer = loaded.tokenizer
        self._vision = loaded.vision
        self._prompt_cache = prompt_cache
        self._grammar_tokenizer = grammar_tokenizer
        self._stops = StopSequences([(token,) for token in sorted(loaded.tokenizer.eos_token_ids)])
        self._generator = BatchGenerator(
            loaded.model,
            completion_batch_size=max_batch,
            prefill_batch_size=min(prefill_batch, max_batch),
            prefill_step_size=prefill_step,
            stream=mx.default_stream(mx.default_device()),
        )
        self._speculation: SpeculativeGenerationBatch | None = None
        self._drafted = self._accepted = 0
        if speculative == "prompt-lookup":
            self._speculation = SpeculativeGenerationBatch.install(self._generator, loaded.model, greedy_sampler)
        else:
            JoiningGenerationBatch.install(self._generator, loaded.model, greedy_sampler)
        self._prefill_step = prefill_step
        self._prefill_batch = min(prefill_batch, max_batch)
        self._sequences: dict[int, ActiveSequence] = {}
        self._pauses: dict[int, list[int]] = {}  # uid -> where its prefill still pauses to keep KV state
        self._reading: list[_Reading] = []  # admitted, their images being prefilled a unit per step
        self._decode_steps: deque[float] = deque([FIRST_DECODE_STEP_SECONDS], maxlen=STEPS_MEASURED)
        self._image_chunk = MIN_IMAGE_CHUNK * 4  # tokens of an image's prefill per step while streams decode
        self._side = SideThread() if self._vision is not None else None  # the tower's work, in turns

    @property
    def active(self) -> int:
        return len(self._sequences) + len(self._reading)

    @property
    def decoding(self) -> int:
        """Sequences past their prefill, whose streams a prefill would stall."""
        started, waiting = prompt_queue_lengths(self._generator)
        return len(self._sequences) - len(started) - len(waiting)

    def final_lengths(self) -> list[int]:
        sequences = [*self._sequences.values(), *(reading.sequence for reading in self._reading)]
        return [sequence.job.final_length for sequence in sequences]

    def pending_prefixes(self) -> set[str]:
        """The stable prefixes whose checkpoints the batch is prefilling now (a sequence past its own is not)."""
        computing = set()
        for uid, pauses in self._pauses.items():
            job = self._sequences[uid].job
            if job.prefix_key is not None and pauses[0] <= job.stable_prefix:
                computing.add(job.prefix_key)
        for reading in self._reading:
            job = reading.sequence.job
            if job.prefix_key is not None and reading.work.position < job.stable_prefix:
                computing.add(job.prefix_key)
        return computing

    def kv_bytes(self) -> int:
        """What the active sequences' batch caches hold now."""
        return int(self._generator.prompt_cache_nbytes)

    def admit(self, job: Job) -> None:
        """Insert a job; it is prefilled in chunks between the decode steps of the others."""
        sequence = ActiveSequence(job, self._prompt_cache, self._tokenizer)
        if job.stop is not None:  # the plan stopped it before it joined
            sequence.finish(job.stop, None, None)
            return
        request = job.request
        try:
            grammar = GrammarProcessor(self._grammar_tokenizer, request.grammar) if request.grammar else None
        except GrammarError as error:
            sequence.fail(error)
            return
        lease = sequence.lease()
        pauses = sequence.pause_points(lease)
        cache, start = lease.cache, lease.cached_tokens
        if request.images:
            work = ImagePrefill(self._vision, cache, request, start, pauses, sequence.keep_state,
                                self._prompt_cache.new_cache, self._side)  # fmt: skip
            if not work.done:
                self._reading.append(_Reading(sequence, grammar, pauses, work))
                return
            cache, start = work.cache, work.position
        self._insert(sequence, grammar, cache, start, pauses)

    def _insert(
        self, sequence: ActiveSequence, grammar: GrammarProcessor | None, cache: list[Any], start: int,
        pauses: list[int],
    ) -> None:  # fmt: skip
        """The sequence joins mlx-lm's batch, its prompt from ``start`` (``cache`` holds what is before)."""
        request, prompt = sequence.job.request, sequence.job.prompt
        pauses = [point for point in pauses if point > start]
        if self._vision is not None and self._vision.positions_on_grid:
            cache = shifted(cache, position_shift(request, start))
        bounds = [start, *pauses, len(prompt)]
        segments = [prompt[begin:end] for begin, end in zip(bounds, bounds[1:])]
        (uid,) = self._generator.insert_segments(
            [segments],
            max_tokens=[request.max_tokens],
            caches=[cache],
            all_tokens=[prompt[:start]],
            samplers=[sampler(request.sampling)],
            logits_processors=[logits_processors(request.sampling, grammar)],
            stop_sequences=[self._stops],
        )
        self._sequences[uid] = sequence
        if pauses:
            self._pauses[uid] = pauses

    def step(self) -> int:
        """One unit of an image's prefill, one decode step for the batch and one prefill chunk; returns the
        tokens generated."""
        reading = self._read_images()
        started, waiting = prompt_queue_lengths(self._generator)
        self._generator.prefill_batch_size = self._prompts_this_step(started, waiting)
        began = time.perf_counter()
        prompt_responses, generation_responses = self._generator.next()
        if generation_responses and not started and not waiting and not reading:  # a decode step alone
            self._decode_steps.append(time.perf_counter() - began)
        for response in prompt_responses:
            pauses = self._pauses.get(response.uid)
            if pauses and response.end_of_segment and not response.end_of_prompt:
                pauses.pop(0)
                if not pauses:
                    del self._pauses[response.uid]
                for cache, tokens in self._generator.extract_cache([response.uid]).values():
                    self._sequences[response.uid].keep_state(cache, list(tokens))
        leaving: list[tuple[int, FinishReason]] = []
        for response in generation_responses:
            sequence = self._sequences.get(response.uid)
            if sequence is None or (response.uid, "stop") in leaving:  # a speculative step's tokens past a stop
                continue
            sequence.token(int(response.token), end_of_sequence=response.finish_reason == "stop")
            if response.finish_reason is not None:
                self._sequences.pop(response.uid)
                self._pauses.pop(response.uid, None)
                self._count_speculation(response.uid, sequence)
                sequence.finish(response.finish_reason, response.prompt_cache, list(response.all_tokens))
            elif sequence.stop_text.matched is not None or sequence.job.stop == "stop":
                leaving.append((response.uid, "stop"))
        for uid, sequence in self._sequences.items():
            stop = sequence.job.stop
            if stop is not None and stop != "stop" and (uid, "stop") not in leaving:
                leaving.append((uid, stop))  # the plan stopped it: its client left, or its time ran out
        if leaving:
            self._remove(leaving)
        return len(generation_responses)

    def _read_images(self) -> bool:
        """One unit of the first admitted image prompt's prefill; it joins the batch when its images are read.
        Returns whether a unit ran.

        While streams decode, a unit is sized towards a quarter of a decode
        step (the median of the last ones), so a stream waits about a quarter
        step more: the tower's work (building its pass's graph, then
        evaluating it in pieces: ``read_span``) goes on for that long on the
        side thread, and a chunk of the image's tokens is resized after
        each one (a chunk's time is not proportional to its tokens: a call has
        its own cost).  A unit is timed from when the decode step mlx-lm left
        running is done (that wait is the step's, not the unit's).  With
        nothing decoding, a chunk is a whole prefill step and the tower's pass
        one unit.
        """
        if not self._reading:
            return False
        reading = self._reading[0]
        job = reading.sequence.job
        if job.stop is not None:
            self._reading.pop(0)
            reading.work.close()
            reading.sequence.finish(job.stop, None, None)
            return False
        decoding = self.decoding > 0
        unit_seconds = statistics.median(self._decode_steps) * UNIT_SHARE_OF_STEP
        mx.synchronize()
        began = time.perf_counter()
        if decoding:
            done = reading.work.advance(self._image_chunk, unit_seconds)
        else:
            done = reading.work.advance(self._prefill_step)
        if done and decoding:  # the next chunk nearer a unit's time
            took = (time.perf_counter() - began) / unit_seconds
            if took < 1 - CHUNK_SLACK or took > 1 + CHUNK_SLACK:
                scaled = int(self._image_chunk / max(took, 1 / CHUNK_GROWTH))
                self._image_chunk = max(MIN_IMAGE_CHUNK, min(self._prefill_step, scaled))
        if reading.work.done:
            self._reading.pop(0)
            self._insert(reading.sequence, reading.grammar, reading.work.cache, reading.work.position, reading.pauses)
        return True

    def _prompts_this_step(self, started: list[int], waiting: list[int]) -> int:
        """How many prompts mlx-lm may prefill together in the next step.

        mlx-lm counts prompts (``prefill_batch_size``), not tokens.  While
        streams are decoding, prompts whose next chunks add up to more than one
        prefill step of tokens go one after another (their first tokens arrive
        in turn), so a running stream stalls at most one chunk's prefill per
        step; short ones still go in groups of up to ``prefill_batch``.  With
        nothing decoding there is no stream to stall, and every waiting prompt
        (up to ``prefill_batch``) goes in one call: measured at 8 clients, one
        call for eight 46-token prompts gave their first tokens 0.7 s sooner
        than two calls of 256 tokens.  ``started`` and ``waiting`` are the
        tokens left of each prompt in the generator's queues.
        """
        decoding = self.active - len(started) - len(waiting)
        budget = self._prefill_step if decoding else sum(min(length, self._prefill_step) for length in waiting)
        used = sum(min(length, self._prefill_step) for length in started)
        allowed = len(started)
        for length in waiting:
            chunk = min(length, self._prefill_step)
            if allowed >= self._prefill_batch or (allowed and used + chunk > budget):
                break
            used += chunk
            allowed += 1
        return max(1, allowed)

    def _remove(self, leaving: list[tuple[int, FinishReason]]) -> None:
        """Take sequences out of the batch mid-way; their KV state so far goes back to the prompt cache."""
        caches = self._generator.remove([uid for uid, _ in leaving], return_prompt_caches=True)
        for uid, reason in leaving:
            sequence = self._sequences.pop(uid)
            self._pauses.pop(uid, None)
            self._count_speculation(uid, sequence)
            cache, tokens = caches.get(uid, (None, None))
            sequence.finish(reason, cache, list(tokens) if tokens is not None else None)

    def _count_speculation(self, uid: int, sequence: ActiveSequence) -> None:
        if self._speculation is not None:
            sequence.stats.drafted_tokens, sequence.stats.accepted_tokens = self._speculation.take_counts(uid)
            self._drafted += sequence.stats.drafted_tokens
            self._accepted += sequence.stats.accepted_tokens

    def speculation_totals(self) -> tuple[int, int]:
        """Drafted and accepted tokens over every sequence that has left, its client connected or not."""
        return self._drafted, self._accepted

    def fail_all(self, error: BaseException) -> None:
        """A step failed: every sequence gets the error, and the batch starts over empty."""
        self._generator.remove(list(self._sequences))
        for sequence in [*self._sequences.values(), *(reading.sequence for reading in self._reading)]:
            sequence.fail(error)
        for reading in self._reading:
            reading.work.close()
        self._sequences.clear()
        self._pauses.clear()
        self._reading.clear()

    def close(self) -> None:
        self._generator.close()
        if self._side is not None:
            self._side.close()
