"""The words every layer of the server shares, and nothing else: this module imports nothing of ours.

Dependencies run one way: the HTTP edge (``edge``) -> the API dialects
(``dialects``) -> the chat core (``chat``) -> the engine (``engine``) -> this
module.  What a conversation is (messages, tools, tool calls), how to sample,
what the engine is asked (``GenerationRequest``) and what it answers
(``EngineEvent`` values, then ``GenerationStats``) are defined here once.  So
are the failures: domain exceptions that say what went wrong, never which
HTTP status it is; each dialect renders them in its own error shape.

``Engine`` is the one surface the chat core reaches the engine through, so a
scripted engine can stand in for the real one in tests.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Protocol, TypeVar, Union, get_args

__all__ = [
    "CUSTOM_TOOL",
    "EFFORTS",
    "FUNCTION_TOOL",
    "PLAIN_SAMPLING",
    "SPECULATIVE_MODES",
    "CacheLookup",
    "CacheSource",
    "ConflictError",
    "ContextOverflowError",
    "Divergence",
    "DocumentPart",
    "Effort",
    "Embedder",
    "Engine",
    "EngineEvent",
    "EngineStats",
    "FinishReason",
    "ForbiddenError",
    "GeneratedText",
    "GenerationFinished",
    "GenerationRequest",
    "GenerationStats",
    "GrammarError",
    "ImagePart",
    "ImageReader",
    "InternalError",
    "InvalidRequestError",
    "KVBudgetError",
    "Lane",
    "Message",
    "ModelKind",
    "ModelLoadingError",
    "ModelState",
    "ModelStatus",
    "ModelUnavailableError",
    "ModelUnloadedError",
    "NotFoundError",
    "Part",
    "PromptAdmitted",
    "PromptCacheStats",
    "PromptImage",
    "ReadImage",
    "RecommendedSampling",
    "RequestTimeoutError",
    "Role",
    "Sampling",
    "ServerError",
    "SpeculativeMode",
    "TextPart",
    "Tokenizer",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolGrammar",
    "ToolMode",
    "UnsupportedOptionError",
]

Role = Literal["system", "user", "assistant", "tool"]
FUNCTION_TOOL = "function"
CUSTOM_TOOL = "custom"
ToolMode = Literal["none", "auto", "required"]
#: How the engine may speculate: off, or drafting from the request's own context (engine/speculation.py).
SpeculativeMode = Literal["off", "prompt-lookup"]
SPECULATIVE_MODES: tuple[SpeculativeMode, ...] = get_args(SpeculativeMode)

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
"""How hard a model should think, in every dialect's words, least to most (OpenAI's ``none`` to ``xhigh``,
Anthropic's ``low`` to ``max``)."""
EFFORTS: tuple[Effort, ...] = get_args(Effort)
CacheSource = Literal["miss", "extended", "copied-prefix", "checkpoint", "snapshot", "off", "response"]
"""What the prompt cache gave a request: nothing (``miss``), its session's conversation continued
(``extended``), a copy of another entry's prefix, a checkpoint or a snapshot; ``off`` when the cache is off,
``response`` when an exact answer was replayed."""
FinishReason = Literal["stop", "length", "tool_calls", "timeout", "cancelled"]
"""Why a completion ended; ``timeout`` and ``cancelled`` never reach a client as a completion."""


# -- a conversation ------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is JSON text for functions, the raw input for custom tools."""

    id: str
    name: str
    arguments: str
    kind: str = FUNCTION_TOOL


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image in a message: its file's bytes (an image file, as the client sent it), or a URL never fetched."""

    data: bytes | None = field(default=None, repr=False)
    media_type: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class DocumentPart:
    """A document in a message: its text, or a file's bytes (a PDF), with the title the client gave it."""

    text: str | None = None
    data: bytes | None = field(default=None, repr=False)
    media_type: str = "text/plain"
    title: str | None = None
    url: str | None = None


Part = Union[TextPart, ImagePart, DocumentPart]
"""A piece of a message's content that is more than text: what the chat core turns into the model's input."""


@dataclass(frozen=True)
class ReadImage:
    """One image as a vision model reads it: the text that stands for it in the prompt, and its pixels.

    ``tokens`` is the run of tokens the image is in the prompt (its markers
    and image tokens, without the whitespace around them that merges with
    neighbouring text); ``digest`` is the image file's content hash (the
    prompt cache's key for its KV state); ``pixels`` is the model processor's
    output and ``grid`` its patch grid where the model has one (engine only).
    ``rope_delta`` is how far the text after the image sits from its index:
    Qwen-VL's M-RoPE places an image's tokens on a grid that takes fewer
    positions than tokens (0 where images take ordinary positions).
    """

    text: str
    tokens: tuple[int, ...]
    digest: bytes
    pixels: Any = field(repr=False, compare=False)
    grid: Any = field(default=None, repr=False, compare=False)
    rope_delta: int = 0


class ImageReader(Protocol):
    """A vision model's way in for images: ``marker`` is what its chat template gets for one image."""

    @property
    def marker(self) -> str: ...

    def read(self, data: bytes, max_pixels: int) -> ReadImage:
        """The image file's tokens and pixels (InvalidRequestError if it is not an image this server reads, or
        has more than ``max_pixels`` pixels)."""
        ...


@dataclass(frozen=True)
class PromptImage:
    """An image in a prompt: its tokens are ``prompt[start:start + length]``."""

    start: int
    length: int
    image: ReadImage

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Message:
    """One conversation turn; ``reasoning`` is a reasoning model's thinking, echoed back by the client.

    ``parts`` holds the content in order when it has images or documents (``content`` is then empty);
    a message of text alone has only ``content``.
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None
    parts: tuple[Part, ...] = ()


@dataclass(frozen=True)
class ToolGrammar:
    """The grammar a custom tool's input must follow: ``lark`` or ``regex`` syntax."""

    syntax: Literal["lark", "regex"]
    definition: str


@dataclass(frozen=True)
class Tool:
    """A tool the model may call.

    A ``function`` takes JSON arguments that match ``parameters``; a ``custom``
    tool takes free text, or text in ``grammar`` when it has one.
    """

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    kind: str = FUNCTION_TOOL
    grammar: ToolGrammar | None = None
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        """A function without parameters takes an empty object (OpenAI's and Anthropic's reading)."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolChoice:
    """``none``, ``auto`` or ``required``; ``name`` forces one tool (and implies ``required``)."""

    mode: ToolMode = "auto"
    name: str | None = None


Value = TypeVar("Value")


@dataclass(frozen=True)
class Sampling:
    """How to sample; ``None`` is "not said here", so that layers of defaults can fill it in.

    A request's sampling is laid over the server's ``--default-*`` options,
    then the model's own ``generation_config.json``, then ``PLAIN_SAMPLING``
    (``over``, in ``chat.profile``): a field is declared once, here, and every
    layer resolves it the same way.  Penalties left ``None`` at the end are off.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def over(self, fallback: Sampling) -> Sampling:
        """These values where they are given, ``fallback``'s elsewhere (stop sequences are the request's own)."""
        filled = {
            item.name: getattr(fallback, item.name)
            for item in fields(self)
            if getattr(self, item.name) is None and item.name != "stop"
        }
        return replace(self, **filled) if filled else self

    def given(self) -> dict[str, Any]:
        """The values that are set, by name (for the start-up line and debug output)."""
        return {name: value for name, value in asdict(self).items() if value not in (None, ())}

    @property
    def deterministic(self) -> bool:
        """Greedy, or seeded: the same prompt always gives the same output."""
        return self.temperature == 0 or self.seed is not None

    @staticmethod
    def require(value: Value | None) -> Value:
        """A value of resolved sampling (laid over ``PLAIN_SAMPLING``, so never None)."""
        if value is None:
            raise ValueError("sampling must be resolved over PLAIN_SAMPLING before the engine reads it")
        return value


#: What sampling means when nothing says otherwise: the model's full distribution, no filters, no penalties.
PLAIN_SAMPLING = Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)


@dataclass(frozen=True)
class RecommendedSampling:
    """The sampling a model's authors recommend (``generation_config.json``, a model card), and where it was read."""

    sampling: Sampling = field(default_factory=Sampling)
    source: str = "none"


@dataclass(frozen=True)
class Lane:
    """The agent session a request belongs to, for the prompt cache: whose entries churn cannot evict.

    ``kind`` says who named it (``claude-code``, ``codex``, ``key``, ``user``);
    ``session`` and ``agent`` are short digests of the identifiers, never the
    identifiers themselves (they are credentials of a kind).  A subagent's
    lane has its ``agent``; ``session_lane`` is the session it belongs to.
    """

    kind: str
    session: str
    agent: str | None = None

    @property
    def session_lane(self) -> Lane:
        return self if self.agent is None else Lane(self.kind, self.session)

    @property
    def is_subagent(self) -> bool:
        return self.agent is not None

    def __str__(self) -> str:
        """``kind:session`` or ``kind:session/agent``: how headers, logs and /v1/cache show it."""
        return f"{self.kind}:{self.session}" + (f"/{self.agent}" if self.agent else "")


# -- what the engine is asked, and what it answers -------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One completion for the engine to generate: at most ``max_tokens``, sampled as ``sampling`` says.

    ``stable_prefix`` is where the system prompt and tools end (a checkpoint
    worth keeping, 0: none).  ``turn_start`` is where the conversation's
    history ends and the generation prompt begins (0: unknown): the next
    turn's prompt agrees with this one up to there whatever the reply
    re-renders to, so a cache that cannot step back keeps a snapshot there;
    ``after_user`` says the history ends with the user's message, a point
    later turns keep agreeing with even when the template re-renders the
    replies after it.  ``lane`` is the client's session, whose cache entries
    other sessions' churn cannot evict.
    ``timeout`` (seconds from now, waiting included) stops generation with
    finish_reason ``timeout``.  ``images`` (a vision model's) say where each
    image's tokens are: the engine prefills them through the vision model, and
    its prompt cache tells images apart by content.  ``request_id`` names the
    request to ``Engine.abort``.
    """

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = PLAIN_SAMPLING  # resolved: laid over PLAIN_SAMPLING
    grammar: str | None = None  # an llguidance grammar the output must follow (None: free)
    stable_prefix: int = 0
    turn_start: int = 0
    after_user: bool = False
    lane: Lane | None = None
    use_cache: bool = True
    timeout: float | None = None
    images: tuple[PromptImage, ...] = ()  # on a vision model: the images in the prompt, in order
    request_id: str = ""


@dataclass(frozen=True)
class Divergence:
    """Where a prompt left the nearest cached one: the token offset, and a few tokens of each from there."""

    at_token: int
    cached: tuple[int, ...]
    prompt: tuple[int, ...]


@dataclass(frozen=True)
class CacheLookup:
    """What the prompt cache gave a request, decided before its prefill starts (``source``: see ``CacheSource``).

    ``divergence`` says where the prompt left the nearest entry on a miss or
    partial hit (None when nothing cached shares a prefix with it, or when it
    was a plain extension).
    """

    cached_tokens: int
    source: CacheSource
    divergence: Divergence | None = None
    lane: Lane | None = None


@dataclass
class GenerationStats:
    """The numbers a user wants about one completion."""

    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_source: CacheSource = "miss"
    finish_reason: FinishReason = "stop"
    stop_sequence: str | None = None  # the stop sequence that ended the completion, if one did
    queue_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    generation_ms: float = 0.0
    drafted_tokens: int = 0  # speculative decoding: tokens proposed, and those the model kept
    accepted_tokens: int = 0

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def tokens_per_second(self) -> float:
        """Decode speed after the first token."""
        decode_seconds = (self.generation_ms - self.time_to_first_token_ms) / 1000
        return (
            (self.completion_tokens - 1) / decode_seconds if self.completion_tokens > 1 and decode_seconds > 0 else 0.0
        )


@dataclass(frozen=True)
class PromptAdmitted:
    """The request joined the batch: its cache lookup is done and its prefill begins."""

    lookup: CacheLookup


@dataclass(frozen=True)
class GeneratedText:
    """A piece of generated text, safe to send (held-back stop text is never in it)."""

    text: str


@dataclass(frozen=True)
class GenerationFinished:
    """The last event of a completion."""

    stats: GenerationStats = field(repr=False)


EngineEvent = Union[PromptAdmitted, GeneratedText, GenerationFinished]


@dataclass(frozen=True)
class EngineStats:
    """What /health and /metrics show of the engine."""

    waiting: int
    running: int
    max_batch: int
    decode_steps: int
    generated_tokens: int
    active_kv_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class PromptCacheStats:
    """What /health, /v1/cache and /metrics show of the prompt cache."""

    enabled: bool
    entries: int
    checkpoints: int
    snapshots: int
    lanes: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    tokens_saved: int
    evictions: int
    persisted_to: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ModelKind = Literal["chat", "embedding"]
ModelState = Literal["unloaded", "downloading", "loading", "loaded", "unloading"]


@dataclass(frozen=True)
class ModelStatus:
    """What /v1/models and the admin routes say of one served model."""

    name: str
    kind: ModelKind
    state: ModelState
    memory_bytes: int
    pinned: bool
    ttl: float
    aliases: tuple[str, ...]
    source: str | None
    failure: str | None = None  # why its last load failed, while requests for it are refused (no server path)
    download: tuple[int, int] | None = None  # bytes done and due while its files download from the hub


class Tokenizer(Protocol):
    """A model's tokenizer, as the layers above the engine use it (mlx-lm's ``TokenizerWrapper`` is one: it passes
    most of these on to the Hugging Face tokenizer it wraps)."""

    @property
    def eos_token_ids(self) -> set[int]: ...

    @property
    def has_chat_template(self) -> bool: ...

    @property
    def detokenizer(self) -> Any: ...

    def encode(self, text: str, **options: Any) -> list[int]: ...

    def decode(self, tokens: list[int], **options: Any) -> str: ...

    def get_vocab(self) -> dict[str, int]: ...

    def apply_chat_template(self, conversation: Any, **options: Any) -> Any: ...


class Engine(Protocol):
    """A chat model's engine as the layers above see it: a tokenizer, a context length, a stream of events,
    and what /health, /v1/cache and /metrics show of it."""

    @property
    def max_batch(self) -> int: ...

    @property
    def model_info(self) -> dict[str, Any]: ...

    def cache_stats(self) -> PromptCacheStats: ...

    def cache_entries(self) -> list[dict[str, Any]]: ...

    def observe_steps(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(batch size)`` after every decode step (from the engine's thread)."""
        ...

    def count_arrivals(self, in_flight: Callable[[], int]) -> None:
        """Read how many requests the server has accepted, to start a lone request at once."""
        ...

    def prefill_checkpoint(self, tokens: list[int]) -> bool:
        """Compute the KV state of ``tokens`` and keep it as a checkpoint (warming the cache); False if kept already."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_length(self) -> int:
        """The longest a prompt and its completion may be together."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        """``PromptAdmitted``, then text, then ``GenerationFinished`` (silences are the reader's to fill).

        Closing the iteration early cancels the request; failures are raised
        as the exceptions below (``KVBudgetError``, ``GrammarError``).
        """
        ...

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer generate (its worker gave up, a distributed rank stopped), or None."""
        ...

    def abort(self, request_id: str) -> None:
        """The reader of ``request_id`` has what it needs (a forced call that started over, say): the sequence
        leaves at the next step and finishes with finish_reason ``stop``.  Unknown or finished ids are ignored."""
        ...

    def stats(self) -> EngineStats: ...


class Embedder(Protocol):
    """An embedding model's engine as the embeddings service sees it."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_length(self) -> int: ...

    @property
    def dimensions(self) -> int: ...

    async def embed(self, inputs: list[list[int]]) -> Any:
        """A float32 array, one pooled vector per input (each input non-empty and within the context)."""
        ...

    def busy(self) -> bool: ...


# -- failures ---------------------------------------------------------------------------


class ServerError(Exception):
    """A failure a client should hear about; each dialect renders it in its own error shape.

    ``param`` names the request field at fault, ``code`` is a stable identifier (either may be None).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(ServerError):
    """The request cannot be answered as sent."""


class UnsupportedOptionError(InvalidRequestError):
    """A recognised option with a value this server does not support."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param, "unsupported_parameter")


class GrammarError(InvalidRequestError):
    """A schema or grammar that cannot be compiled, or a tokenizer that cannot drive constrained decoding."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param, "invalid_schema")


class ContextOverflowError(ServerError):
    """The prompt (plus the requested completion, when ``completion_tokens`` is set) does not fit the context."""

    def __init__(self, context_length: int, prompt_tokens: int, completion_tokens: int | None, param: str) -> None:
        super().__init__(f"{prompt_tokens} prompt tokens do not fit the {context_length}-token context", param)
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class KVBudgetError(ServerError):
    """A request whose KV state could not fit the KV budget even decoding alone."""


class ModelLoadingError(ServerError):
    """The model is not loaded yet."""

    def __init__(self) -> None:
        super().__init__("the model is still loading; retry shortly")


class ModelUnavailableError(ServerError):
    """A served model that cannot be loaded now: it does not fit the memory budget, or its files cannot be read."""

    def __init__(self, message: str, code: str = "model_unavailable") -> None:
        super().__init__(message, "model", code)


class ModelUnloadedError(ServerError):
    """The model was unloaded (an admin's unload, or the server stopping) before the request could finish."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} was unloaded before this request finished; send it again", "model")


class RequestTimeoutError(ServerError):
    """The request ran past the server's time limit; ``completion_tokens`` were generated before it stopped."""

    def __init__(self, completion_tokens: int) -> None:
        super().__init__(
            f"the request ran past the server's --request-timeout and was stopped after {completion_tokens} "
            "generated tokens; raise the timeout or lower max_tokens"
        )
        self.completion_tokens = completion_tokens


class NotFoundError(ServerError):
    """Something the request names does not exist (a stored response, say)."""


class ConflictError(ServerError):
    """The request asks for what the server's configuration forbids now (unloading a pinned model, say)."""


class ForbiddenError(ServerError):
    """The request is well formed, but this server does not allow it (a route turned off by its operator)."""


class InternalError(ServerError):
    """An unexpected failure, already reported (a debug file and an ERROR line); the client hears only this."""

    def __init__(self) -> None:
        super().__init__("the server hit an internal error")
