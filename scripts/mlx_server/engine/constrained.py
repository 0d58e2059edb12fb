"""Constrained decoding at the token level: an llguidance matcher per sequence masks what its grammar forbids.

The engine gets a grammar as text (the chat core writes it); at every step the
matcher computes which tokens keep the output inside it, and the rest get
-inf before sampling, so the output parses by construction.  Once the grammar
is complete only end-of-sequence remains.

``llguidance.mlx`` applies the mask with a Metal kernel; on CPU the bitmask is
unpacked with numpy and applied with ``mx.where``, which works everywhere.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, ClassVar

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from mlx_server.mlx_lm_compat import hf_tokenizer
from mlx_server.vocabulary import GrammarError

__all__ = ["GrammarProcessor", "GrammarTokenizer"]

logger = logging.getLogger("mlx")


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it; built once per tokenizer, at warm-up or on first use.

    Building it walks the whole vocabulary: about 0.7 s for a 49k-token one, 7 s
    for Gemma 3's 262k. ``of`` gives every engine over the same tokenizer object
    (one loaded model served with and without the cache, as the tests do) the
    same one, so it is built once.
    """

    _shared: ClassVar[weakref.WeakKeyDictionary[Any, GrammarTokenizer]] = weakref.WeakKeyDictionary()
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, tokenizer: Any) -> GrammarTokenizer:
        """The vocabulary shared by everything that uses ``tokenizer`` (kept while the tokenizer lives)."""
        with cls._shared_lock:
            vocabulary = cls._shared.get(tokenizer)
            if vocabulary is None:
                vocabulary = cls._shared[tokenizer] = cls(tokenizer)
            return vocabulary

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = weakref.ref(tokenizer)  # so that the shared map lets an unloaded model's tokenizer go
        self._built: llguidance.LLTokenizer | None = None
        self.special_ids: np.ndarray[Any, np.dtype[np.int64]] = np.zeros(0, dtype=np.int64)
        self.unavailable: str | None = None
        self._lock = threading.Lock()

    def get(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer; GrammarError when this model's tokenizer cannot be used."""
        with self._lock:
            if self._built is None and self.unavailable is None:
                tokenizer = self._tokenizer()
                assert tokenizer is not None, "whoever asks for the vocabulary holds its tokenizer"
                inner = hf_tokenizer(tokenizer)
                try:
                    eos = sorted(tokenizer.eos_token_ids)
                    self._built = llguidance.hf.from_tokenizer(inner, eos_token=eos)
                    added = getattr(inner, "added_tokens_decoder", {}) or {}
                    self.special_ids = np.array(
                        sorted(i for i in added if i < self._built.vocab_size and self._built.is_special_token(i)),
                        dtype=np.int64,
                    )
                    logger.info("Constrained decoding ready (llguidance, %d tokens)", self._built.vocab_size)
                except (ValueError, TypeError, AttributeError) as error:
                    self.unavailable = (
                        f"constrained decoding needs a fast tokenizer; this model's cannot be used ({error})"
                    )
                    logger.warning("%s", self.unavailable)
            if self._built is None:
                raise GrammarError("response_format", self.unavailable or "constrained decoding is unavailable")
            return self._built


class GrammarProcessor:
    """An mlx-lm logits processor that masks every token the grammar does not allow next.

    mlx-lm calls it with the tokens so far and the next-token logits; from the
    second call on, the last token is the one sampled after the previous call,
    which the matcher consumes before computing the next mask.
    """

    def __init__(self, vocabulary: GrammarTokenizer, grammar: str) -> None:
        tokenizer = vocabulary.get()
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError("response_format", self.matcher.get_error())
        self._tokenizer = tokenizer
        self._special = vocabulary.special_ids
        self._eos = frozenset(tokenizer.eos_tokens)
        self._started = False
        self._ended = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._ended:
            return logits
        if self._started:
            token = int(tokens[-1])
            if token in self._eos:
                # A batch computes one step past end-of-sequence; the matcher must not see it.
                self._ended = True
                return logits
            if not self.matcher.consume_token(token):
                logger.warning("Constrained decoding: the grammar refused a token (%s)", self.matcher.get_error())
        self._started = True
        if self.matcher.is_error():
            return logits
        allowed = self._allowed_tokens(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, logits.dtype))

    def _allowed_tokens(self, vocabulary: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if bits.size < vocabulary:  # the model's output layer may be padded past the vocabulary
            bits = np.concatenate([bits, np.zeros(vocabulary - bits.size, dtype=np.uint8)])
        allowed = bits[:vocabulary].astype(np.bool_)
        # llguidance's mask can let a special token through where the grammar forces its text (inside a
        # JSON string: "</tool_call>" in an argument), then refuses the token; ask the matcher itself.
        refused = [int(token) for token in self._special[allowed[self._special]]
                   if token not in self._eos and self.matcher.validate_tokens([int(token)]) != 1]  # fmt: skip
        if refused:
            allowed[refused] = False
            if not allowed.any():  # the forced text was all the mask offered: write it as text tokens
                forced = self.matcher.compute_ff_bytes().decode("utf-8", errors="ignore")
                first = self._tokenizer.greedy_tokenize(forced)[:1]
                if first and self.matcher.validate_tokens(first) == 1:
                    allowed[first[0]] = True
        return allowed
