"""Every use of mlx-lm's private parts, in one place, checked against the installed release at start-up.

The engine needs a few things mlx-lm does not expose: the generation and
prompt batches of a ``BatchGenerator`` (to decode a lone sequence
speculatively, and to let a finished prompt join in the batch's next step
rather than a forward pass of its own: ``JoiningGenerationBatch``), that batch's
per-row state (the pending token and its log-probabilities, the count of
generated tokens, the stop matchers, the penalties' token context), the
generator's prompt queues (to prefill by tokens, not by prompt count), the
Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper`` (llguidance and
``save_pretrained`` need it), mlx-lm's inference of a template's tool
parser, and the batch KV cache's per-row offset (``ShiftedKVCache``).
Nothing else in the server names a private mlx-lm attribute or subclasses
an mlx-lm class.

``SUPPORTED_MLX_LM`` is the range ``pyproject.toml`` pins; ``check`` probes
every attribute below on the installed release (a generator over the real
model, an empty generation batch, the tokenizer module) and raises
``IncompatibleMlxLmError`` with a sentence naming what is gone and which
mlx-lm is installed, so a release that renamed one is refused at start-up
instead of failing at the first request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import mlx.core as mx
from mlx_lm import tokenizer_utils
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch, StopSequences
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.sample_utils import greedy_sampler

__all__ = [
    "REQUIRED_ATTRIBUTES",
    "SUPPORTED_MLX_LM",
    "IncompatibleMlxLmError",
    "JoiningGenerationBatch",
    "ShiftedKVCache",
    "check",
    "hf_tokenizer",
    "infer_tool_parser",
    "install_batches",
    "installed_version",
    "missing_attributes",
    "prompt_queue_lengths",
    "shifted",
]

#: The mlx-lm releases this module was read against (the pin in pyproject.toml).
SUPPORTED_MLX_LM = ">=0.32.1,<0.33"


@dataclass(frozen=True)
class Attribute:
    """A private attribute the server relies on: whose it is, its name, and what it is used for."""

    owner: str
    name: str
    used_for: str


REQUIRED_ATTRIBUTES = (
    Attribute("BatchGenerator", "_generation_batch", "replacing the generation batch with the server's own"),
    Attribute("BatchGenerator", "_prompt_batch", "prompts joining the batch in its own next step"),
    Attribute("BatchGenerator", "_currently_processing", "prefilling by tokens, not by prompt count"),
    Attribute("BatchGenerator", "_unprocessed_sequences", "prefilling by tokens, not by prompt count"),
    Attribute("GenerationBatch", "_next_tokens", "the token a speculative step starts from"),
    Attribute("GenerationBatch", "_next_logprobs", "the log-probabilities of that token"),
    Attribute("GenerationBatch", "_num_tokens", "each row's length limit during speculation"),
    Attribute("GenerationBatch", "_matchers", "each row's stop-token matcher during speculation"),
    Attribute("GenerationBatch", "_token_context", "penalties and grammars over kept draft tokens"),
    Attribute("TokenizerWrapper", "_tokenizer", "the Hugging Face tokenizer llguidance reads"),
    Attribute("tokenizer_utils", "_infer_tool_parser", "the tool-call format a chat template teaches"),
)


class IncompatibleMlxLmError(RuntimeError):
    """The installed mlx-lm lacks something the server relies on; the message says what and which release."""


def installed_version() -> str:
    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return "unknown"


def missing_attributes(model: Any = None, tokenizer: Any = None) -> list[Attribute]:
    """The required attributes the installed mlx-lm does not have (probed on real objects where given)."""
    owners: dict[str, Any] = {"tokenizer_utils": tokenizer_utils, "GenerationBatch": _empty_generation_batch()}
    if model is not None:
        generator = BatchGenerator(model, completion_batch_size=1, prefill_batch_size=1)
        owners["BatchGenerator"] = generator
    if tokenizer is not None:
        owners["TokenizerWrapper"] = tokenizer
    return [
        attribute
        for attribute in REQUIRED_ATTRIBUTES
        if attribute.owner in owners and not hasattr(owners[attribute.owner], attribute.name)
    ]


def check(model: Any = None, tokenizer: Any = None) -> None:
    """IncompatibleMlxLmError naming every missing attribute and the installed release; nothing when all are there."""
    missing = missing_attributes(model, tokenizer)
    if missing:
        names = ", ".join(f"{attribute.owner}.{attribute.name} ({attribute.used_for})" for attribute in missing)
        raise IncompatibleMlxLmError(
            f"mlx-lm {installed_version()} lacks {names}: this server runs on mlx-lm {SUPPORTED_MLX_LM}; "
            f"reinstall with `pip install 'mlx-lm{SUPPORTED_MLX_LM}'` (make serve does)"
        )


def _empty_generation_batch() -> GenerationBatch:
    empty: GenerationBatch = GenerationBatch.empty(None, greedy_sampler)
    return empty


# -- the batch generator ----------------------------------------------------------------------------------


def install_batches(generator: BatchGenerator, batch: GenerationBatch) -> None:
    """Make ``batch`` the generator's generation batch, and its prompt batch one whose finished prompts join
    it without a step of their own (``JoiningGenerationBatch``)."""
    generator._generation_batch = batch
    generator._prompt_batch = _JoiningPromptBatch.empty(
        generator.model, generator.sampler, prefill_step_size=generator.prefill_step_size
    )


def prompt_queue_lengths(generator: BatchGenerator) -> tuple[list[int], list[int]]:
    """Tokens still to prefill: of each prompt being prefilled now, and of each prompt waiting to start."""
    started = [sum(len(segment) for segment in entry[0]) for entry in generator._currently_processing]
    waiting = [sum(len(segment) for segment in entry[1]) for entry in generator._unprocessed_sequences]
    return started, waiting


class _PendingRows(GenerationBatch):
    """Prompts prefilled but for their last token, which the generation batch's next step feeds.

    mlx-lm makes a finished prompt a generation batch of its own, whose
    constructor runs a step for it alone (the last token's forward pass and
    the first token's sampling), and then extends the decoding batch with it:
    every stream decoding meanwhile waits for that extra pass, about a whole
    step where the vocabulary's projection is most of a step.  These rows
    skip it (``_step`` is their constructor's only call of it).
    """

    def _step(self) -> tuple[list[int], list[mx.array]]:
        self._next_logprobs = [_NO_LOGPROBS] * len(self.uids)  # read by nothing: the step that feeds them skips them
        return [], []


_NO_LOGPROBS = mx.array(0.0)


class _JoiningPromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, whose finished prompts become ``_PendingRows`` (mlx-lm's ``generate`` otherwise)."""

    def generate(self, tokens: list[list[int]]) -> GenerationBatch:
        if any(len(prompt) > 1 for prompt in tokens):
            self.prompt([prompt[:-1] for prompt in tokens])
        last = mx.array([prompt[-1] for prompt in tokens], dtype=mx.uint32)  # the samplers' dtype
        rows = _PendingRows(
            self.model, self.uids, last, self.prompt_cache, self.tokens, self.samplers, self.fallback_sampler,
            self.logits_processors, self.stop_sequences, self.max_tokens,
        )  # fmt: skip
        self.uids, self.prompt_cache, self.tokens, self.samplers = [], [], [], []
        self.logits_processors, self.stop_sequences, self.max_tokens = [], [], []
        return rows


class JoiningGenerationBatch(GenerationBatch):
    """mlx-lm's generation batch, in which joining rows' first step is the batch's own next step; with a hook
    for a step that is not plain decoding, and the row state it needs.

    Rows that join while others decode feed their prompt's last token in the
    batch's next step, beside the others' pending tokens: what that step
    samples for them is their first token, reported (as mlx-lm reports every
    token) a step later.  That step's output for them is their prompt's last
    token, so the row's length and stop matcher must not count it: the step
    is mlx-lm's ``next`` with those rows' count started one lower and a
    matcher that matches nothing.  Rows joining an empty batch take their
    step at once, as in mlx-lm (no one waits, and their first token comes a
    step sooner).

    ``speculate`` returns the step's responses, or None for a plain step.
    The methods below are the only way a subclass reaches the batch's private state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._joining: set[int] = set()  # uids whose prompt's last token the next step feeds
        super().__init__(*args, **kwargs)

    @classmethod
    def install(cls: type[Batch], generator: BatchGenerator, model: Any, sampler: Any) -> Batch:
        batch: Batch = cls.empty(model, sampler)
        install_batches(generator, batch)
        return batch

    def extend(self, batch: GenerationBatch) -> None:
        decoding = len(self.uids) > 0
        super().extend(batch)  # type: ignore[no-untyped-call]  # mlx-lm's batches carry no annotations
        if isinstance(batch, _PendingRows):
            if decoding:
                self._joining.update(batch.uids)
            else:
                self._step()

    def next(self) -> list[GenerationBatch.Response]:
        if self._joining:
            return self._joining_step()
        responses = self.speculate()
        return super().next() if responses is None else responses

    def _joining_step(self) -> list[GenerationBatch.Response]:
        joining, self._joining = self._joining, set()
        matchers = {}
        for row, uid in enumerate(self.uids):
            if uid in joining:
                self._num_tokens[row] -= 1
                matchers[uid], self._matchers[row] = self._matchers[row], _MATCHES_NOTHING
        responses: list[GenerationBatch.Response] = super().next()
        for row, uid in enumerate(self.uids):  # rows that finished have left: the joining ones are all here
            if uid in matchers:
                self._matchers[row] = matchers[uid]
        return [response for response in responses if response.uid not in joining]

    def speculate(self) -> list[GenerationBatch.Response] | None:
        return None

    def pending_token(self) -> mx.array | None:
        """The sampled token every row feeds next (None: nothing pending)."""
        pending: mx.array | None = self._next_tokens
        return pending

    def pending_logprobs(self, row: int) -> mx.array:
        logprobs: mx.array = self._next_logprobs[row]
        return logprobs

    def set_pending(self, token: mx.array, logprobs: mx.array) -> None:
        """For a lone row: the token it feeds next, and its log-probabilities."""
        self._next_tokens, self._next_logprobs = token.reshape(1), [logprobs]

    def generated_tokens(self, row: int) -> int:
        count: int = self._num_tokens[row]
        return count

    def processing_context(self, row: int, token: int) -> mx.array:
        """The row's tokens so far with ``token`` appended, as its logits processors read them."""
        context: mx.array = self._token_context[row].update_and_fetch(mx.array([token]))
        return context

    def keep_token(self, row: int, token: int) -> bool:
        """Record ``token`` as generated by ``row``; True when it completes one of the row's stop sequences."""
        self.tokens[row].append(token)
        self._num_tokens[row] += 1
        matched: bool = self._matchers[row].advance(token)
        return matched


_MATCHES_NOTHING = StopSequences().matcher()
Batch = TypeVar("Batch", bound=JoiningGenerationBatch)


# -- the tokenizer ---------------------------------------------------------------------------------------


class ShiftedKVCache(KVCache):
    """A sequence's ``KVCache`` whose rotary positions in the batch run ``rope_delta`` from its length.

    Qwen-VL's M-RoPE puts an image's tokens on a grid: the text after the image
    sits at its index plus a delta (negative: an image of 16 tokens on a 4 x 4
    grid takes 4 positions).  Text on that grid has its three coordinates equal,
    where M-RoPE is the ordinary rotary embedding, so mlx-lm's language model runs
    it unchanged given the right offset.  mlx-lm's ``BatchKVCache`` keeps one
    ``offset`` per row that only the rotary embedding reads (writes and masks use
    its own index and padding), and carries it through ``filter``, ``extend``,
    ``trim`` and padding; only ``merge``, where rows join, builds it from each
    row's length.  A row's cache layers are handed to the batch as
    ``ShiftedKVCache``, whose ``merge`` adds each row's delta to that offset: text
    rows at 0, an image row at its images' deltas, kept while the row decodes,
    and dropped again when its state is extracted (``extract`` gives a plain
    ``KVCache`` of the true length; the prompt cache keys the images by content,
    so a cached prefix's delta follows from the prompt: ``position_shift``).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # mlx-lm's caches carry no annotations
        self.rope_delta = 0

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKVCache:
        """mlx-lm's merge (dispatched on the first row's class), then each row's delta added to its offset."""
        batch: BatchKVCache = BatchKVCache.merge(caches)
        deltas = [int(getattr(cache, "rope_delta", 0)) for cache in caches]
        if any(deltas):
            batch.offset = batch.offset + mx.array(deltas)
        return batch


def shifted(cache: list[Any], rope_delta: int) -> list[Any]:
    """The layers of a sequence's cache for the batch: each ``KVCache`` as a ``ShiftedKVCache`` holding the same
    arrays (nothing copied); other layers (a linear attention's state has no positions) as they are.

    Every row of such a model joins this way, text rows too: mlx-lm merges
    by the first row's class, so one plain row first would drop the others'
    deltas.
    """
    layers: list[Any] = []
    for layer in cache:
        if isinstance(layer, KVCache):
            row = ShiftedKVCache()
            row.keys, row.values, row.offset = layer.keys, layer.values, layer.offset
            row.rope_delta = rope_delta
            layer = row
        layers.append(layer)
    return layers


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper`` (itself when it is not wrapped)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def infer_tool_parser(tokenizer: Any) -> str | None:
    """The name of the mlx-lm tool parser the tokenizer's chat template teaches (None: it names none)."""
    infer: Callable[[Any], str | None] = tokenizer_utils._infer_tool_parser
    try:
        return infer(hf_tokenizer(tokenizer))
    except (AttributeError, KeyError, TypeError, ValueError):  # an odd template: Hermes is the safe default
        return None


# -- the tool parsers' value readers (a streamed call's arguments are typed as the final parse types them) --------


def qwen3_coder_value(value: str, key: str, properties: dict[str, Any]) -> Any:
    """A ``<parameter=key>`` value typed by the schema's properties, as mlx-lm's Qwen3-Coder parser types it."""
    from mlx_lm.tool_parsers.qwen3_coder import _convert_param_value

    return _convert_param_value(value, key, properties)


def glm_value(value: str) -> Any:
    """A GLM ``<arg_value>`` that is not a string, read as mlx-lm's GLM 4.7 parser reads it."""
    from mlx_lm.tool_parsers.glm47 import _deserialize

    return _deserialize(value)


def python_literal(source: str) -> Any:
    """A pythonic call's keyword value (``true``/``false``/``null`` spelled either way) as mlx-lm's parser reads it."""
    import ast

    from mlx_lm.tool_parsers.pythonic import _JSONLiterals

    return ast.literal_eval(_JSONLiterals().visit(ast.parse(source.strip(), mode="eval").body))
