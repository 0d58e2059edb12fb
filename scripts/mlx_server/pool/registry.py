"""Which models the server serves, under which names: ``--model``, ``--embedding-model``, ``--alias`` and the TOML file.

A request names a model the way its client knows it (``claude-sonnet-4-5``,
``gpt-4o``, ``local-model``); the registry says which served model answers:
one of that name, else the first alias whose glob matches, else the default
(the first chat model, or embedding model).  A configuration the server
cannot honour (a duplicate name, an alias to nothing, an unreadable file) is
a ``RegistryError`` whose message says what to fix, raised at start-up.

The TOML file (``--models-config``)::

    default = "main"            # optional: else the first chat model
    ttl = 600                   # optional: idle seconds before any model unloads

    [models.main]
    source = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
    aliases = ["claude-sonnet-*", "claude-opus-*"]
    pinned = true               # never unloaded
    context_length = 32768
    kv_bits = 8
    kv_budget = "8G"
    temperature = 0.7           # default sampling: temperature, top_p, top_k, min_p, repetition_penalty

    [models.small]
    source = "mlx-community/Qwen3-0.6B-4bit"
    aliases = ["claude-haiku-*"]
    ttl = 300

    [models.embed]
    source = "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ"
    kind = "embedding"
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
from argparse import ArgumentTypeError
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_server.settings import Settings, parse_bytes
from mlx_server.vocabulary import InvalidRequestError, ModelKind, Sampling

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ModelSpec", "Registry", "RegistryError", "build_registry", "model_argument"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
MODEL_FIELDS = {"source", "kind", "aliases", "pinned", "ttl", "context_length", "kv_bits", "kv_budget",
                *SAMPLING_FIELDS}  # fmt: skip
DOCUMENT_FIELDS = {"default", "ttl", "models"}


class RegistryError(ValueError):
    """The models' configuration cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its name, where it comes from, what it is for, and how it is kept.

    ``source`` None is the bundled default model.  ``ttl`` 0 keeps it while
    memory allows; ``sampling`` is this model's default sampling, laid over
    what its own files recommend.
    """

    name: str
    source: str | None
    kind: ModelKind = "chat"
    pinned: bool = False
    ttl: float = 0.0
    context_length: int | None = None
    kv_bits: int | None = None
    kv_budget: int | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Registry:
    """The served models in order (the first of each kind is its default) and the aliases, in order."""

    models: tuple[ModelSpec, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def named(self, name: str) -> ModelSpec | None:
        return next((spec for spec in self.models if spec.name == name), None)

    def default(self, kind: ModelKind) -> ModelSpec | None:
        return next((spec for spec in self.models if spec.kind == kind), None)

    def resolve(self, requested: str, kind: ModelKind) -> ModelSpec:
        """The model of ``kind`` that answers a request naming ``requested`` (InvalidRequestError if none can).

        A served model's own name wins, then the first alias that matches; a
        name neither matches goes to the default model of the kind.  Naming a
        model of the other kind is an error: a chat request to an embedding
        model, or the reverse.
        """
        spec = self.named(requested)
        if spec is None:
            target = next((name for pattern, name in self.aliases if fnmatch.fnmatchcase(requested, pattern)), None)
            spec = self.named(target) if target is not None else None
        if spec is not None and spec.kind != kind:
            where = (
                "it is an embedding model: send it to /v1/embeddings"
                if spec.kind == "embedding"
                else "it is a chat model: send it to /v1/chat/completions, /v1/messages or /v1/responses"
            )
            raise InvalidRequestError(f"model {requested!r} cannot answer this request: {where}", "model",
                                      "model_kind_mismatch")  # fmt: skip
        spec = spec or self.default(kind)
        if spec is None:
            flag = "--embedding-model" if kind == "embedding" else "--model"
            raise InvalidRequestError(f"no {kind} model is served here: start the server with {flag}", "model",
                                      "model_not_found")  # fmt: skip
        return spec


def model_argument(argument: str) -> tuple[str | None, str]:
    """``NAME=SOURCE`` or ``SOURCE``: (NAME or None, SOURCE)."""
    name, separator, source = argument.partition("=")
    if separator and NAME_PATTERN.match(name) and source:
        return name, source
    return None, argument


def default_name(source: str | None) -> str:
    """A model's name from its source: the file's stem, the directory's or the repo's last part."""
    if source is None:
        from mlx_server.model.default_model import find_default_model

        try:
            return find_default_model().stem
        except FileNotFoundError:
            return "default"
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def build_registry(settings: Settings) -> Registry:
    """The served models from the command line (first) and the TOML file; RegistryError on anything inconsistent."""
    models: list[ModelSpec] = []
    aliases: list[tuple[str, str]] = []
    ttl = settings.model_ttl
    document: dict[str, Any] = {}
    path = settings.models_config
    if path is not None:
        document = _read_config(path)
        _check_keys(f"{path}", document, DOCUMENT_FIELDS)
        if "ttl" in document:
            ttl = _seconds(f"{path}: ttl", document["ttl"])
    for kind, arguments in (("chat", settings.models), ("embedding", settings.embedding_models)):
        for argument in arguments:
            name, source = model_argument(argument)
            models.append(ModelSpec(name or default_name(source), source, kind, ttl=ttl))  # type: ignore[arg-type]
    tables = document.get("models", {})
    if not isinstance(tables, Mapping):
        raise RegistryError(f"{path}: models must be a table of models ([models.NAME] sections)")
    for name, table in tables.items():
        spec, table_aliases = _spec_from_table(name, table, ttl, path)
        models.append(spec)
        aliases += [(pattern, name) for pattern in table_aliases]
    if not any(spec.kind == "chat" for spec in models):
        models.insert(0, ModelSpec(default_name(None), None, ttl=ttl))
    for argument in settings.aliases:
        pattern, separator, target = argument.rpartition("=")
        if not separator or not pattern or not target:
            raise RegistryError(f"--alias {argument!r}: expected PATTERN=NAME, e.g. 'claude-haiku-*=small'")
        aliases.append((pattern, target))
    default = document.get("default")
    if default is not None:
        chosen = next((spec for spec in models if spec.name == default), None)
        if chosen is None:
            raise RegistryError(f"{path}: default = {default!r} names no model")
        models.remove(chosen)
        models.insert(0, chosen)
    _check(models, aliases)
    return Registry(tuple(models), tuple(aliases))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = tomllib.loads(path.read_text())
        return document
    except OSError as error:
        raise RegistryError(f"--models-config {path}: {error.strerror or error}") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RegistryError(f"--models-config {path} is not valid TOML: {error}") from error


def _spec_from_table(name: str, table: Any, ttl: float, path: Path | None) -> tuple[ModelSpec, tuple[str, ...]]:
    where = f"{path} [models.{name}]"
    if not isinstance(table, Mapping):
        raise RegistryError(f"{where} must be a table")
    _check_keys(where, table, MODEL_FIELDS)
    if "source" not in table:
        raise RegistryError(f"{where}: needs a source (a .gguf file, an MLX directory or a Hugging Face repo id)")
    source = table["source"]
    if not isinstance(source, str) or not source.strip():
        raise RegistryError(f"{where}: source must be a path or a repo id (a non-empty string), not {source!r}")
    kind = table.get("kind", "chat")
    if kind not in ("chat", "embedding"):
        raise RegistryError(f"{where}: kind must be chat or embedding, not {kind!r}")
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(alias, str) and alias for alias in aliases):
        raise RegistryError(f"{where}: aliases must be a list of glob patterns (strings)")
    pinned = table.get("pinned", False)
    if not isinstance(pinned, bool):
        raise RegistryError(f"{where}: pinned must be true or false, not {pinned!r}")
    kv_bits = table.get("kv_bits")
    if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in (4, 8)):
        raise RegistryError(f"{where}: kv_bits must be 4 or 8, not {kv_bits!r}")
    spec = ModelSpec(
        name=name,
        source=source,
        kind=kind,
        pinned=pinned,
        ttl=_seconds(f"{where}: ttl", table["ttl"]) if "ttl" in table else ttl,
        context_length=_count(f"{where}: context_length", table["context_length"])
        if "context_length" in table
        else None,
        kv_bits=kv_bits,
        kv_budget=_size(f"{where}: kv_budget", table["kv_budget"]) if "kv_budget" in table else None,
        sampling=_sampling(where, table),
    )
    return spec, tuple(aliases)


def _check_keys(where: str, table: Mapping[str, Any], known: Collection[str]) -> None:
    unknown = set(table) - set(known)
    if unknown:
        raise RegistryError(f"{where}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")


def _number(where: str, value: Any) -> float:
    """A TOML number (never a string or a boolean), finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistryError(f"{where} must be a finite number, not {value!r}")
    return float(value)


def _seconds(where: str, value: Any) -> float:
    seconds = _number(where, value)
    if seconds < 0:
        raise RegistryError(f"{where} must be 0 or more seconds, not {value!r}")
    return seconds


def _count(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RegistryError(f"{where} must be a whole number of at least 1, not {value!r}")
    return value


def _size(where: str, value: Any) -> int:
    """A byte size: a positive whole number of bytes, or text such as "8G" (never inf, nan or negative)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RegistryError(f'{where} must be a size such as "8G" or a number of bytes, not {value!r}')
    try:
        return parse_bytes(str(value))
    except ArgumentTypeError as error:
        raise RegistryError(f"{where}: {error}") from None


#: Each sampling key's range, as its --default-* flag takes it (None: no upper bound).
SAMPLING_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "temperature": (0.0, 2.0, False),  # (lowest, highest, whether the lowest itself is excluded)
    "top_p": (0.0, 1.0, True),
    "top_k": (0.0, None, False),
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, 10.0, True),
}


def _sampling(where: str, table: Mapping[str, Any]) -> Sampling:
    values: dict[str, Any] = {}
    for key in SAMPLING_FIELDS:
        if key not in table:
            continue
        value = _number(f"{where}: {key}", table[key])
        lowest, highest, exclusive = SAMPLING_RANGES[key]
        if value < lowest or (exclusive and value == lowest) or (highest is not None and value > highest):
            bound = f"above {lowest:g}" if exclusive else f"at least {lowest:g}"
            said = f"{bound} and at most {highest:g}" if highest is not None else bound
            raise RegistryError(f"{where}: {key} must be {said}, not {table[key]!r}")
        if key == "top_k":
            if value != int(value):
                raise RegistryError(f"{where}: top_k must be a whole number, not {table[key]!r}")
            values[key] = int(value)
        else:
            values[key] = value
    return Sampling(**values)


def _check(models: Iterable[ModelSpec], aliases: Iterable[tuple[str, str]]) -> None:
    seen: set[str] = set()
    for spec in models:
        if not NAME_PATTERN.match(spec.name):
            raise RegistryError(f"model name {spec.name!r}: use letters, digits, '.', '_', ':' and '-'")
        if spec.name in seen:
            raise RegistryError(f"two models are named {spec.name!r}: name one of them, --model NAME=SOURCE")
        seen.add(spec.name)
    for pattern, target in aliases:
        if target not in seen:
            raise RegistryError(
                f"alias {pattern!r} points to {target!r}, which is not a served model ({', '.join(sorted(seen))})"
            )
