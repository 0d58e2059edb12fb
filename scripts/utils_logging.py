"""Drop-in debug logging for anyclaude scripts: one file, standard library only.

Copy this file next to a script, then::

    sys.path.insert(0, str(Path(__file__).parent))
    from utils_logging import setup_logger, debug, PerformanceTimer

``ANYCLAUDE_DEBUG`` (0-3) decides what is shown: 0 nothing extra, 1 debug
messages, cache hits and misses and error files, 2 performance timers as well,
3 full data structures, pretty-printed.  The level is read once at import;
``set_debug_level`` and ``reload_from_environment`` change it at run time.

Guarantees, each tested: a logging call never raises into its caller; secrets
(authorization headers, API keys, cookies, tokens) never reach a log line or a
file; a disabled ``debug()`` costs one comparison.  Runs on Python 3.9-3.13.
See LOGGING_GUIDE.md beside this file for the complete reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import hashlib
import inspect
import io
import itertools
import json
import logging
import logging.handlers
import math
import os
import pathlib
import platform
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Callable, TypeVar, cast

__all__ = [
    "REDACTED",
    "AnyclaudeFormatter",
    "DebugLevel",
    "PerformanceTimer",
    "debug",
    "display_debug_startup",
    "get_debug_directory",
    "get_debug_level",
    "get_request_id",
    "is_debug_enabled",
    "is_trace_debug_enabled",
    "is_verbose_debug_enabled",
    "log_cache_hit",
    "log_cache_miss",
    "log_debug_error",
    "log_performance",
    "redact",
    "reload_from_environment",
    "request_context",
    "set_debug_level",
    "setup_logger",
    "timing_decorator",
    "write_error_debug_file",
]

DEBUG_ENV_VAR = "ANYCLAUDE_DEBUG"
LOG_FORMAT_ENV_VAR = "ANYCLAUDE_LOG_FORMAT"
DEBUG_DIR_ENV_VAR = "ANYCLAUDE_DEBUG_DIR"
DEBUG_MAX_FILES_ENV_VAR = "ANYCLAUDE_DEBUG_MAX_FILES"

DEFAULT_FORMAT = "[%(asctime)s] [%(name)s] %(levelname)s: %(message)s"
DEFAULT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
DEBUG_LOGGER_NAME = "anyclaude"
REDACTED = "[REDACTED]"

#: Below level 3 a debug line's data is cut to this many characters.
MAX_DATA_CHARS_BELOW_TRACE = 2_000
#: Below level 3 a container in debug data shows at most this many items.
MAX_ITEMS_BELOW_TRACE = 100
#: At level 3 a string in debug data is cut past this many characters (an attachment's base64, say).
MAX_TRACE_STRING_CHARS = 16 * 1024
#: No debug line is longer than this, at any level (what is cut is said).
MAX_LINE_CHARS = 256 * 1024
#: Nesting deeper than this is shown as a marker instead of being walked.
MAX_DEPTH = 32
#: Rotating log files: size of one file and how many old ones are kept.
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUP_COUNT = 3
#: Error debug files: newest kept, size of one file, longest string kept in one.
DEFAULT_MAX_DEBUG_FILES = 100
MAX_DEBUG_FILE_BYTES = 1024 * 1024
MAX_DEBUG_FILE_STRING_CHARS = 64 * 1024
#: The index of error files is rotated once it passes this size.
MAX_INDEX_BYTES = 256 * 1024
#: Cache keys longer than this are shown as a digest.
MAX_DISPLAYED_KEY_CHARS = 32

_TRUNCATION_MARKER = "…[truncated {} chars]"

_F = TypeVar("_F", bound=Callable[..., Any])


class DebugLevel(enum.IntEnum):
    """What ``ANYCLAUDE_DEBUG`` selects; each level shows everything below it."""

    DISABLED = 0
    BASIC = 1
    VERBOSE = 2
    TRACE = 3


_LEVEL_DESCRIPTIONS = {
    DebugLevel.BASIC: "debug messages, cache hits and misses, error debug files",
    DebugLevel.VERBOSE: "+ performance timers and checkpoints",
    DebugLevel.TRACE: "+ full data structures, pretty-printed (strings past 16 KiB cut, and said)",
}

# ---------------------------------------------------------------------------
# Module state: everything that changes at run time, in one place.
# ---------------------------------------------------------------------------

_debug_level: int = 0  # read by every call; set_debug_level() and reload_from_environment() change it
_log_format: str = "text"  # "text" or "json": given to each formatter when it is made or the format changes
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("anyclaude_request_id", default=None)
_warned: set[str] = set()  # keys of the internal warnings already given
_warned_lock = threading.Lock()
_key_memo: dict[str, str | None] = {}  # mapping key -> as written out, None when it names a secret
_scrub_memo: dict[str, str] = {}  # short text -> the same text scrubbed
_console_handlers: weakref.WeakSet[_StderrHandler] = weakref.WeakSet()  # to re-decide colour on reload
_formatters: weakref.WeakSet[AnyclaudeFormatter] = weakref.WeakSet()  # to switch text/json on reload
_setup_lock = threading.RLock()  # setup_logger()
_file_lock = threading.Lock()  # error debug files
_fallback_directory: str | None = None  # used instead of an unsafe debug directory
_debug_logger: logging.Logger  # the ``anyclaude`` logger, installed at the end of this module

# ---------------------------------------------------------------------------
# Internal warnings: said once, never raised.
# ---------------------------------------------------------------------------

_MAX_REMEMBERED_WARNINGS = 1_000


def _warn_once(key: str, message: str) -> None:
    """Log ``message`` at WARNING the first time ``key`` is seen; never raises."""
    try:
        with _warned_lock:
            if key in _warned:
                return
            if len(_warned) >= _MAX_REMEMBERED_WARNINGS:
                _warned.clear()
            _warned.add(key)
        _debug_logger.warning(message)
    except Exception:  # noqa: BLE001 - the warning path must not fail its caller
        pass


# ---------------------------------------------------------------------------
# Debug level: parsed once, read with one global lookup.
# ---------------------------------------------------------------------------

_TRUE_WORDS = frozenset({"true", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "no", "off"})


def _parse_debug_level(raw: str | None) -> tuple[DebugLevel, str | None]:
    """Turn an ``ANYCLAUDE_DEBUG`` value into a level and an optional warning."""
    text = (raw or "").strip().lower()
    if not text or text in _FALSE_WORDS:
        return DebugLevel.DISABLED, None
    if text in _TRUE_WORDS:
        return DebugLevel.BASIC, None
    try:
        number = int(text)
    except ValueError:
        return DebugLevel.DISABLED, (
            f"{DEBUG_ENV_VAR}={raw!r} is not a debug level (use 0-3, true/yes/on or false/no/off); debugging stays off"
        )
    return DebugLevel(min(max(number, 0), 3)), None


def _parse_log_format(raw: str | None) -> tuple[str, str | None]:
    text = (raw or "").strip().lower()
    if text in ("", "text"):
        return "text", None
    if text == "json":
        return "json", None
    return "text", f"{LOG_FORMAT_ENV_VAR}={raw!r} is not 'text' or 'json'; using text"


def get_debug_level() -> DebugLevel:
    """The current level (cached; no environment read)."""
    return DebugLevel(_debug_level)


def set_debug_level(level: int) -> DebugLevel:
    """Change the level at run time; values are clamped to 0-3.  Returns the new level."""
    global _debug_level
    try:
        _debug_level = min(max(int(level), 0), 3)
    except (TypeError, ValueError):
        _warn_once(f"set-level:{level!r}", f"set_debug_level({level!r}) ignored: not a number")
    return DebugLevel(_debug_level)


def reload_from_environment() -> DebugLevel:
    """Re-read ``ANYCLAUDE_DEBUG`` and ``ANYCLAUDE_LOG_FORMAT``; returns the new level.

    Invalid values fall back to the defaults with one warning naming the value.
    """
    global _debug_level, _log_format
    raw_level = os.environ.get(DEBUG_ENV_VAR)
    level, level_warning = _parse_debug_level(raw_level)
    _debug_level = int(level)
    raw_format = os.environ.get(LOG_FORMAT_ENV_VAR)
    _log_format, format_warning = _parse_log_format(raw_format)
    for formatter in list(_formatters):
        formatter.log_format = _log_format
    for handler in list(_console_handlers):
        handler.forget_color_decision()
    if level_warning:
        _warn_once(f"level:{raw_level}", level_warning)
    if format_warning:
        _warn_once(f"format:{raw_format}", format_warning)
    return level


def is_debug_enabled() -> bool:
    """True at level 1 or above."""
    return _debug_level >= DebugLevel.BASIC


def is_verbose_debug_enabled() -> bool:
    """True at level 2 or above."""
    return _debug_level >= DebugLevel.VERBOSE


def is_trace_debug_enabled() -> bool:
    """True at level 3."""
    return _debug_level >= DebugLevel.TRACE


# ---------------------------------------------------------------------------
# Request context: an id bound once appears on every line of that request.
# ---------------------------------------------------------------------------


def get_request_id() -> str | None:
    """The request id bound in the current thread or asyncio task, if any."""
    return _request_id.get()


@contextlib.contextmanager
def request_context(request_id: str | None = None) -> Iterator[str]:
    """Bind a request id (a random one if not given) for the lines logged inside.

    Uses ``contextvars``, so concurrent threads and asyncio tasks keep their own id.
    """
    bound = request_id if request_id else f"req_{secrets.token_hex(6)}"
    token = _request_id.set(bound)
    try:
        yield bound
    finally:
        _request_id.reset(token)


# ---------------------------------------------------------------------------
# Redaction: the one scrubber for log lines and files.
# ---------------------------------------------------------------------------

# Keys are normalized (camelCase split, lower case, '-' -> '_') and then matched
# against the Sentry-style denylist: whole names, or a name ending in one of them.
_SECRET_KEY_PATTERN = re.compile(
    r"(?:^|_)(?:password|passwd|pwd|passphrase|secret|secret_?key|client_?secret|"
    r"api_?key|apikey|access_?key|private_?key|privatekey|credentials?|"
    r"cookies?|set_cookie|authorization|auth|session|session_?id|sessionid|"
    r"token|access_?token|refresh_?token|id_?token|auth_?token|csrf_?token|"
    r"xsrf_?token|jwt|bearer|signature|dsn)$"
    r"|^(?:password|passwd|secret|private_?key)(?:_|$)"
    # Who a client is, which is nobody's business but the client's: OpenAI's ``user``, ``prompt_cache_key`` and
    # ``safety_identifier``, Anthropic's ``metadata.user_id``, agents' thread, conversation and subagent ids.
    r"|^(?:user|end_?user|user_?id|prompt_?cache_?key|safety_?identifier)$"
    r"|(?:^|_)(?:thread|agent|conversation)_?id$"
)
# Names that end in "token" but say where in a token stream, not which credential:
# time_to_first_token, diverged_at_token, seconds_per_token.
_TOKEN_POSITION_PATTERN = re.compile(r"(?:^|_)(?:at|to|per|first|last|each)_token$")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_MAX_MEMO_KEYS = 4_096


def _is_secret_key(key: str) -> bool:
    """Whether a mapping key or header name names a secret."""
    normalized = _CAMEL_BOUNDARY.sub("_", key).lower().replace("-", "_").strip("_ ")
    return _SECRET_KEY_PATTERN.search(normalized) is not None and _TOKEN_POSITION_PATTERN.search(normalized) is None


def _written_key_or_none(key: str) -> str | None:
    """A mapping key as written out (scrubbed), or None when it names a secret (memoized)."""
    try:
        return _key_memo[key]
    except KeyError:
        pass
    shown = None if _is_secret_key(key) else _scrub_text(key)
    if len(_key_memo) >= _MAX_MEMO_KEYS:
        _key_memo.clear()
    _key_memo[key] = shown
    return shown


def _safe_key_text(key: object) -> str:
    return _scrub_text(key if type(key) is str else _safe_str(key))


# Secret-shaped values in free text, masked wholly (no prefix is kept).  Each
# rule is (a literal it needs, whether it runs on the lower-cased text, its
# pattern): a rule whose literal is absent costs one ``in`` test, and every
# pattern starts with its literal so that ``re`` scans for it at C speed, so
# a long prompt costs one fast pass per rule.  Case-insensitive rules name the
# group that is masked; the others mask the whole match.
_ASSIGNED_VALUE = (
    r"""(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?"""  # a quote (JSON-escaped or not), then = or :
    r"""(?P<secret>(?:(?:basic|bearer|token|digest)\s+)?[^\s"'\\,;&}]+)"""
)
_TEXT_RULES: tuple[tuple[str, bool, re.Pattern[str]], ...] = tuple(
    (literal, lowered, re.compile(pattern))
    for literal, lowered, pattern in (
        ("sk-", False, r"sk-(?<![A-Za-z0-9_]sk-)(?:ant-)?[A-Za-z0-9_\-]{6,}"),
        ("A", False, r"A(?<![A-Za-z0-9_]A)(?:Iza[0-9A-Za-z_\-]{20,}|[KS]IA[0-9A-Z]{16}(?![0-9A-Za-z]))"),
        ("gh", False, r"gh(?<![A-Za-z0-9_]gh)[pousr]_[A-Za-z0-9]{20,}"),
        ("github_pat_", False, r"github_pat_[A-Za-z0-9_]{20,}"),
        ("hf_", False, r"hf_(?<![A-Za-z0-9_]hf_)[A-Za-z0-9]{20,}"),
        ("xox", False, r"xox(?<![A-Za-z0-9_]xox)[abposr]-[A-Za-z0-9\-]{10,}"),
        ("eyJ", False, r"eyJ(?<![A-Za-z0-9_]eyJ)[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
        ("-----BEGIN", False, r"-----BEGIN[A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END[A-Z ]*PRIVATE KEY-----|\Z)"),
        ("bearer", True, r"(?P<secret>bearer(?<![a-z0-9_]bearer)\s+[a-z0-9\-._~+/]{8,}=*)"),  # RFC 6750 token68
        ("://", True, r"://(?P<secret>[^/\s:@\"'\\]+:[^/\s@\"'\\]+)@"),
        # ``name=value`` / ``name: value``: the name stays, the value goes.
        ("pass", True, r"pass(?:word|wd|phrase)?" + _ASSIGNED_VALUE),
        ("secret", True, r"secret" + _ASSIGNED_VALUE),
        ("api", True, r"api[_-]?key" + _ASSIGNED_VALUE),
        ("token", True, r"token" + _ASSIGNED_VALUE),
        ("auth", True, r"auth(?:orization)?" + _ASSIGNED_VALUE),
        ("cookie", True, r"cookie" + _ASSIGNED_VALUE),
    )
)
#: No rule can match text shorter than this ("token=x").
_MIN_SECRET_CHARS = 7
_MAX_MEMO_TEXT_CHARS = 256


def _secret_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    lowered = text.lower()
    same_offsets = len(lowered) == len(text)  # lower() can change a few characters' lengths
    for literal, on_lowered, rule in _TEXT_RULES:
        if not on_lowered:
            if literal in text:
                spans.extend(match.span() for match in rule.finditer(text))
        elif literal in lowered:
            if same_offsets:
                spans.extend(match.span("secret") for match in rule.finditer(lowered))
            else:
                spans.extend(match.span("secret") for match in re.finditer(rule.pattern, text, re.IGNORECASE))
    return spans


def _scrub_uncached(text: str) -> str:
    if len(text) < _MIN_SECRET_CHARS:
        return text
    spans = _secret_spans(text)
    if not spans:
        return text
    spans.sort()
    pieces: list[str] = []
    position = 0
    for start, end in spans:
        if end <= position:
            continue
        if start > position:
            pieces.append(text[position:start])
        if start >= position:
            pieces.append(REDACTED)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _scrub_text(text: str) -> str:
    """Mask secret-shaped substrings of ``text`` (memoized for short texts)."""
    cached = _scrub_memo.get(text)
    if cached is not None:
        return cached
    result = _scrub_uncached(text)
    if len(text) <= _MAX_MEMO_TEXT_CHARS:
        if len(_scrub_memo) >= _MAX_MEMO_KEYS:
            _scrub_memo.clear()
        _scrub_memo[text] = result
    return result


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters with a marker saying how much was cut.

    The region around the cut is scrubbed first, so a secret straddling the cut
    is masked rather than half-shown.
    """
    if len(text) <= limit:
        return text
    head = _scrub_uncached(text[: limit + 512])[:limit]
    return head + _TRUNCATION_MARKER.format(len(text) - limit)


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ is the caller's data, not our failure
        return f"<unrepresentable {type(value).__name__}>"


def _safe_str(value: object) -> str:
    try:
        return value if isinstance(value, str) else str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break logging
        return _safe_repr(value)


class _Sanitizer:
    """Turns any object into JSON-safe data with secrets removed.

    Never raises for any input: recursion, NaN, huge integers, broken ``__repr__``,
    and objects of unknown types all become plain values or markers.  Strings
    are scrubbed here, one by one, so the rendered line needs no second pass.
    """

    __slots__ = ("max_items", "max_string")

    def __init__(self, max_string: int | None, max_items: int | None) -> None:
        self.max_string = max_string
        self.max_items = max_items

    def __call__(self, value: object) -> object:
        return self._walk(value, 0, set())

    def _text(self, text: str) -> object:
        if len(text) < _MIN_SECRET_CHARS:
            return text
        if text[0] in _JSON_START:
            parsed = self._parse_json(text)
            if parsed is not None:
                return parsed
        if self.max_string is not None and len(text) > self.max_string:
            return _truncate(text, self.max_string)
        return _scrub_text(text)

    def _parse_json(self, text: str) -> str | None:
        """JSON text (a request body) is scrubbed by structure, keys included."""
        if len(text) > 4 * MAX_DEBUG_FILE_BYTES or text.lstrip()[:1] not in ("{", "["):
            return None
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(parsed, (dict, list)):
            return None
        cleaned = self._walk(parsed, 1, set())
        return json.dumps(cleaned, ensure_ascii=False, separators=(",", ":"))

    def _walk(self, value: object, depth: int, path: set[int]) -> object:
        kind = type(value)
        if kind is str:
            return self._text(cast(str, value))
        if value is None or kind is bool:
            return value
        if kind is int:
            return value if cast(int, value).bit_length() < _MAX_INT_BITS else "<integer too large>"
        if kind is float:
            number = cast(float, value)
            return number if math.isfinite(number) else _safe_repr(number)
        if depth >= MAX_DEPTH:
            return "<max depth>"
        if kind is dict or kind is list or kind is tuple:
            identity = id(value)
            if identity in path:
                return "<recursion>"
            path.add(identity)
            try:
                if kind is dict:
                    return self._mapping(cast("dict[object, object]", value), depth, path)
                return self._sequence(cast("list[object]", value), depth, path)
            finally:
                path.discard(identity)
        return self._other(value, depth, path)

    def _mapping(self, mapping: dict[object, object], depth: int, path: set[int]) -> object:
        result: dict[str, object] = {}
        items: Iterable[tuple[object, Any]] = mapping.items()
        limit = self.max_items
        if limit is not None and len(mapping) > limit:
            items = itertools.islice(items, limit)
            result["…"] = f"{len(mapping) - limit} more keys"
        key_memo, scrub_memo, json_start, short = _key_memo, _scrub_memo, _JSON_START, _MIN_SECRET_CHARS
        # Inlined for the common leaf types (no calls, locals only): this loop is
        # most of a debug line's cost.
        item: Any
        for key, item in items:
            name = key_memo.get(key, _UNSEEN) if type(key) is str else _UNSEEN
            if name is _UNSEEN:
                name = _written_key_or_none(key if type(key) is str else _safe_str(key))
            if name is None:
                result[_safe_key_text(key)] = REDACTED
                continue
            kind = type(item)
            if kind is str:
                if len(item) < short:
                    result[name] = item
                    continue
                cleaned = scrub_memo.get(item) if item[0] not in json_start else None
                result[name] = cleaned if cleaned is not None else self._text(item)
            elif item is None or kind is bool:
                result[name] = item
            else:
                result[name] = self._walk(item, depth + 1, path)
        return result

    def _sequence(self, items: list[object], depth: int, path: set[int]) -> object:
        # A (name, value) pair such as a header tuple hides its value when the name is secret.
        if len(items) == 2 and type(items[0]) is str and _written_key_or_none(items[0]) is None:
            return [items[0], REDACTED]
        limit = self.max_items
        result: list[object] = []
        for index, item in enumerate(items):
            if limit is not None and index >= limit:
                result.append(f"…[{len(items) - index} more items]")
                break
            result.append(self._walk(item, depth + 1, path))
        return result

    def _other(self, value: object, depth: int, path: set[int]) -> object:
        converted = _to_plain(value)
        if converted is value:
            return self._text(_safe_repr(value))
        identity = id(value)
        if identity in path:
            return "<recursion>"
        path.add(identity)
        try:
            return self._walk(converted, depth, path)
        finally:
            path.discard(identity)


_JSON_START = frozenset("{[ \t\n\r")  # json.loads skips only these four spaces
_UNSEEN: Any = object()
_MAX_INT_BITS = 10_000  # json.dumps refuses integers past ~4,300 digits


def _to_plain(value: object) -> object:
    """Convert a known non-JSON type to plain data; returns ``value`` itself if unknown."""
    try:
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (set, frozenset)):
            try:
                return sorted(value)
            except Exception:  # noqa: BLE001 - unorderable members keep iteration order
                return list(value)
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).decode("utf-8", errors="replace")
        if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
            return value.isoformat()
        if isinstance(value, _dt.timedelta):
            return value.total_seconds()
        if isinstance(value, (pathlib.PurePath, uuid.UUID, decimal.Decimal)):
            return str(value)
        if isinstance(value, BaseException):
            return {"type": type(value).__name__, "message": _safe_str(value)}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {field.name: getattr(value, field.name, None) for field in dataclasses.fields(value)}
        model_dump = getattr(value, "model_dump", None)  # pydantic v2 models
        if callable(model_dump) and not isinstance(value, type):
            return model_dump()
    except Exception:  # noqa: BLE001 - a hostile object falls back to its repr
        return value
    return value


#: Unbounded, for redact() and level-3 lines; the bounded ones serve lines below level 3 and error files.
_sanitize_whole = _Sanitizer(max_string=None, max_items=None)
_sanitize_for_trace = _Sanitizer(max_string=MAX_TRACE_STRING_CHARS, max_items=None)
_sanitize_for_line = _Sanitizer(max_string=MAX_DATA_CHARS_BELOW_TRACE, max_items=MAX_ITEMS_BELOW_TRACE)
_sanitize_for_error_file = _Sanitizer(max_string=MAX_DEBUG_FILE_STRING_CHARS, max_items=1_000)
_sanitize_for_small_error_file = _Sanitizer(max_string=2_048, max_items=100)


def redact(value: object) -> object:
    """Return a JSON-safe copy of ``value`` with every secret replaced by ``[REDACTED]``.

    Mapping keys and header names from the denylist (authorization, cookie,
    x-api-key, password, token, ...) hide their values at any depth; JSON text
    and bytes are parsed and scrubbed the same way; secret-shaped values in free
    text (``sk-...``, ``Bearer ...``, ``AIza...``, ``ghp_...``) are masked
    wholly.  Never raises; the input is not modified.
    """
    try:
        return _sanitize_whole(value)
    except Exception as error:  # noqa: BLE001 - the scrubber must never fail its caller
        return f"<unredactable {type(value).__name__}: {type(error).__name__}>"


# ---------------------------------------------------------------------------
# Formatting and handlers
# ---------------------------------------------------------------------------

_COLORS = {
    logging.DEBUG: "\x1b[36m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[1;31m",
}
_RESET = "\x1b[0m"


def _color_wanted(stream: object) -> bool:
    """Colour only on a TTY; ``NO_COLOR`` turns it off, ``FORCE_COLOR`` on."""
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force and force != "0":
        return True
    try:
        return bool(getattr(stream, "isatty", lambda: False)())
    except Exception:  # noqa: BLE001 - a closed or odd stream simply gets no colour
        return False


class _RequestIdFilter(logging.Filter):
    """Puts the request id bound where a line is logged on its record (``request_id``, ``-`` when none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        record.anyclaude_request_id = request_id
        record.request_id = request_id or "-"
        return True


_request_id_filter = _RequestIdFilter()


class AnyclaudeFormatter(logging.Formatter):
    """Text (the guide's format) or JSON lines, with the request id, scrubbed of secrets.

    ``log_format`` is ``ANYCLAUDE_LOG_FORMAT`` when the formatter is made, and
    follows it when ``reload_from_environment`` reads it again.  The request
    id comes from the record (the handlers ``setup_logger`` makes carry a
    filter that puts it there; elsewhere it is read when the line is
    formatted).  Lines from ``debug()`` arrive scrubbed; the message and
    traceback of any other record (the host's own ``logger.info``) are
    scrubbed here.
    """

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt or DEFAULT_FORMAT, datefmt or DEFAULT_DATE_FORMAT)
        self._is_default_format = fmt is None or fmt == DEFAULT_FORMAT
        self._mentions_request_id = "request_id" in (fmt or "")
        self._time_cache: tuple[int, str] = (-1, "")
        self.color = False
        self.log_format = _log_format
        _formatters.add(self)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # strftime is a visible part of a line's cost, and its text changes once a second.
        second = int(record.created)
        cached_second, cached_text = self._time_cache
        if second == cached_second:
            return cached_text
        text = time.strftime(datefmt or self.datefmt or DEFAULT_DATE_FORMAT, self.converter(record.created))
        self._time_cache = (second, text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not getattr(record, "anyclaude_scrubbed", False):
            message = _scrub_text(message)
        if not hasattr(record, "anyclaude_request_id"):  # a handler without the filter: the id bound now
            _request_id_filter.filter(record)
        request_id: str | None = getattr(record, "anyclaude_request_id", None)
        if self.log_format == "json":
            line = self._format_json(record, message, request_id)
        else:
            if request_id is not None and not self._mentions_request_id:
                message = f"[{request_id}] {message}"
            line = self._format_text(record, message)
        if self.color:
            color = _COLORS.get(record.levelno)
            if color:
                line = f"{color}{line}{_RESET}"
        return line

    def _format_text(self, record: logging.LogRecord, message: str) -> str:
        record.message = message
        if self._is_default_format:
            line = f"[{self.formatTime(record)}] [{record.name}] {record.levelname}: {message}"
        else:
            if self.usesTime():
                record.asctime = self.formatTime(record, self.datefmt)
            line = self.formatMessage(record)
        details = self._exception_and_stack(record)
        return f"{line}\n{details}" if details else line

    def _exception_and_stack(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(_scrub_text(record.exc_text))
        if record.stack_info:
            parts.append(_scrub_text(self.formatStack(record.stack_info)))
        return "\n".join(parts)

    def _format_json(self, record: logging.LogRecord, message: str, request_id: str | None) -> str:
        entry: dict[str, object] = {
            "time": _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, "anyclaude_message", message),
        }
        if hasattr(record, "anyclaude_data"):
            entry["data"] = record.anyclaude_data
        if request_id is not None:
            entry["request_id"] = request_id
        details = self._exception_and_stack(record)
        if details:
            entry["exception"] = details
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the line (pytest, redirection)."""

    def __init__(self) -> None:
        super().__init__()
        self._color_stream_id = 0
        _console_handlers.add(self)

    def forget_color_decision(self) -> None:
        """Decide colour again at the next line (the environment may have changed)."""
        self._color_stream_id = 0

    @property
    def stream(self) -> IO[str]:
        current = sys.stderr
        if id(current) != self._color_stream_id and isinstance(self.formatter, AnyclaudeFormatter):
            self._color_stream_id = id(current)
            self.formatter.color = _color_wanted(current)
        return current

    @stream.setter
    def stream(self, _value: object) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # StreamHandler.emit, less a second lock round-trip and stream lookup in flush().
        try:
            stream = self.stream
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - reported by logging's own handleError, as StreamHandler does
            self.handleError(record)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file whose every generation is created with mode 0600."""

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        descriptor = os.open(self.baseFilename, flags, 0o600)
        with contextlib.suppress(OSError):
            os.fchmod(descriptor, 0o600)
        return open(descriptor, "a", encoding=self.encoding or "utf-8", errors=self.errors)


_OWNER_MARK = "_anyclaude_handler"


def _our_handler(logger: logging.Logger, mark: str) -> logging.Handler | None:
    for handler in logger.handlers:
        if getattr(handler, _OWNER_MARK, None) == mark:
            return handler
    return None


def _writes_to_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def setup_logger(
    name: str,
    level: int = logging.INFO,
    log_file: str | os.PathLike[str] | None = None,
    format_string: str | None = None,
) -> logging.Logger:
    """Configure and return the logger ``name`` with the guide's line format.

    Idempotent and thread-safe: a second call updates the handlers it added
    instead of adding more, and handlers added by anyone else are kept.  The
    logger stops propagating to the root logger, so a root configuration
    (``basicConfig``, uvicorn's) never prints its lines a second time; if the
    logger already has someone else's console handler, no second one is added.
    ``log_file`` rotates (10 MiB x 3) and is created with mode 0600.
    """
    logger = logging.getLogger(name)
    with _setup_lock:
        logger.setLevel(level)
        logger.propagate = False
        console = _our_handler(logger, "console")
        if console is None and not any(_writes_to_console(h) for h in logger.handlers):
            console = _StderrHandler()
            setattr(console, _OWNER_MARK, "console")
            logger.addHandler(console)
        if console is not None:
            console.setFormatter(AnyclaudeFormatter(format_string))
            console.addFilter(_request_id_filter)
        if log_file is not None:
            path = os.path.abspath(os.fspath(log_file))
            mark = f"file:{path}"
            file_handler = _our_handler(logger, mark)
            if file_handler is None:
                try:
                    file_handler = _PrivateRotatingFileHandler(
                        path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUP_COUNT, encoding="utf-8"
                    )
                except OSError as error:
                    _warn_once(
                        f"log-file:{path}", f"cannot open log file {path}: {error.strerror}; logging to stderr only"
                    )
                else:
                    setattr(file_handler, _OWNER_MARK, mark)
                    logger.addHandler(file_handler)
            if file_handler is not None:
                file_handler.setFormatter(AnyclaudeFormatter(format_string))
                file_handler.addFilter(_request_id_filter)
    return logger


def _install_debug_logger() -> logging.Logger:
    """The ``anyclaude`` logger works with no set-up call (the original dropped lines)."""
    return setup_logger(DEBUG_LOGGER_NAME, logging.DEBUG)


# ---------------------------------------------------------------------------
# debug() and the helpers built on it
# ---------------------------------------------------------------------------

_MISSING: Any = object()


def _evaluate_lazy(data: object) -> object:
    if callable(data) and not isinstance(data, type):
        try:
            return data()
        except Exception as error:  # noqa: BLE001 - a failing lazy value is shown, not raised
            return f"<lazy data raised {type(error).__name__}: {_safe_str(error)}>"
    return data


def _render(message: object, data: object, level: int) -> tuple[str, str, object]:
    """Build (line text, message, sanitized data) for a debug line, all scrubbed."""
    text = _scrub_text(message if type(message) is str else _safe_str(message))
    if data is _MISSING:
        return text, text, _MISSING
    trace = level >= DebugLevel.TRACE
    plain = (_sanitize_for_trace if trace else _sanitize_for_line)(_evaluate_lazy(data))
    if trace:
        rendered = json.dumps(plain, ensure_ascii=False, indent=2)
        if len(rendered) > MAX_LINE_CHARS:
            rendered = _truncate(rendered, MAX_LINE_CHARS)
            plain = rendered
    else:
        rendered = json.dumps(plain, ensure_ascii=False, separators=(",", ":"))
        if len(rendered) > MAX_DATA_CHARS_BELOW_TRACE:
            rendered = _truncate(rendered, MAX_DATA_CHARS_BELOW_TRACE)
            plain = rendered
    return f"{text} {rendered}", text, plain


def _emit(log_level: int, message: object, data: object, caller_depth: int) -> None:
    """Write one line on the ``anyclaude`` logger; the caller has checked the debug level.

    ``caller_depth`` counts the frames between this function and the code
    whose file and line the record should carry (``stacklevel`` does the walk).
    """
    logger = _debug_logger
    if not logger.isEnabledFor(log_level):
        return
    line, clean_message, plain = _render(message, data, _debug_level)
    extra: dict[str, object] = {"anyclaude_scrubbed": True, "anyclaude_message": clean_message}
    if plain is not _MISSING:
        extra["anyclaude_data"] = plain
    logger.log(log_level, line, extra=extra, stacklevel=caller_depth + 2)


def _emit_safely(log_level: int, message: object, data: object, caller_depth: int) -> None:
    try:
        _emit(log_level, message, data, caller_depth + 1)
    except Exception as error:  # noqa: BLE001 - logging never raises into its caller
        _warn_once(f"emit:{type(error).__name__}", f"a debug line was dropped: {type(error).__name__}: {error}")


def debug(level: int, message: object, data: object = _MISSING) -> None:
    """Log ``message`` (and ``data`` as JSON) on ``anyclaude`` when the level is at least ``level``.

    ``data`` may be anything; a zero-argument callable is called only when the
    line is written.  Compact JSON cut to 2,000 characters below level 3,
    pretty and whole at level 3.  Never raises; when the level is too low this
    is one comparison.
    """
    try:
        if level > _debug_level or not _debug_level:
            return
        _emit_safely(logging.DEBUG, message, data, 1)
    except Exception as error:  # noqa: BLE001 - e.g. a level that is not a number
        _warn_once(f"debug-level:{type(level).__name__}", f"debug() called with an invalid level {level!r}: {error}")


def _cache_key_for_line(key: object) -> str:
    """A cache key as shown in logs: itself if short, else a short stable digest."""
    text = _safe_str(key)
    if len(text) <= MAX_DISPLAYED_KEY_CHARS and "\n" not in text:
        return text
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:12]
    return f"sha256:{digest} ({len(text)} chars)"


def log_cache_hit(cache_type: str, key: object, metadata: object = None) -> None:
    """At level >= 1: ``[Cache] HIT - <cache_type>: <key> {metadata}``.  Never raises."""
    if not _debug_level:
        return
    try:
        message = f"[Cache] HIT - {cache_type}: {_cache_key_for_line(key)}"
        _emit_safely(logging.DEBUG, message, _MISSING if metadata is None else metadata, 1)
    except Exception:  # noqa: BLE001 - see _emit_safely; nothing here may raise
        pass


def log_cache_miss(cache_type: str, key: object, reason: str | None = None, details: object = None) -> None:
    """At level >= 1: ``[Cache] MISS - <cache_type>: <key> (reason) {details}``.  Never raises."""
    if not _debug_level:
        return
    try:
        suffix = f" ({reason})" if reason else ""
        message = f"[Cache] MISS - {cache_type}: {_cache_key_for_line(key)}{suffix}"
        _emit_safely(logging.DEBUG, message, _MISSING if details is None else details, 1)
    except Exception:  # noqa: BLE001 - see _emit_safely; nothing here may raise
        pass


def log_performance(name: str, duration_ms: float, details: object = None) -> None:
    """At level >= 2: ``[Perf] <name>: <ms>ms {details}``.  Never raises."""
    if _debug_level < DebugLevel.VERBOSE:
        return
    try:
        message = f"[Perf] {name}: {float(duration_ms):.2f}ms"
        _emit_safely(logging.DEBUG, message, _MISSING if details is None else details, 1)
    except Exception:  # noqa: BLE001 - e.g. a duration that is not a number
        _emit_safely(logging.DEBUG, f"[Perf] {name}: {duration_ms!r}", _MISSING, 1)


# ---------------------------------------------------------------------------
# PerformanceTimer
# ---------------------------------------------------------------------------


class PerformanceTimer:
    """Times a block with a monotonic clock; a context manager (sync and async) and a decorator.

    ``checkpoint(label)`` returns the elapsed milliseconds and logs
    ``[Timer] <name> @ <label>: 10.45ms``; leaving the block logs
    ``[Timer] <name> completed in 5400.50ms``; both when the debug level is at
    least ``log_level``.  An exception logs ``[Timer] <name> failed after
    <ms>ms: <ExcType>`` at ERROR whenever debugging is on, and is re-raised.

    ``elapsed_ms`` and ``checkpoints`` are plain data for responses and metrics.
    One instance times one block at a time; used as a decorator, every call
    gets a fresh timer, so concurrent threads and tasks never share state.
    """

    def __init__(self, name: str, log_level: int = DebugLevel.VERBOSE) -> None:
        self.name = name
        self.log_level = log_level
        self.checkpoints: dict[str, float] = {}
        self._start = time.perf_counter()
        self._end: float | None = None

    @property
    def elapsed_ms(self) -> float:
        """Milliseconds since the block started; frozen once it has ended."""
        end = self._end if self._end is not None else time.perf_counter()
        return (end - self._start) * 1000.0

    def checkpoint(self, label: str) -> float:
        """Record and return the elapsed milliseconds at ``label``; never raises."""
        elapsed = self.elapsed_ms
        self.checkpoints[label] = elapsed
        if self.log_level <= _debug_level:
            _emit_safely(logging.DEBUG, f"[Timer] {self.name} @ {label}: {elapsed:.2f}ms", _MISSING, 1)
        return elapsed

    def as_dict(self) -> dict[str, object]:
        """The timings as data: name, elapsed_ms and the checkpoints in order."""
        return {"name": self.name, "elapsed_ms": round(self.elapsed_ms, 3), "checkpoints": dict(self.checkpoints)}

    def start(self) -> PerformanceTimer:
        self.checkpoints = {}
        self._end = None
        self._start = time.perf_counter()
        return self

    def stop(self, error: BaseException | None = None) -> float:
        """End the block, log its line, and return the elapsed milliseconds."""
        self._end = time.perf_counter()
        elapsed = self.elapsed_ms
        if error is not None:
            if _debug_level:
                message = f"[Timer] {self.name} failed after {elapsed:.2f}ms: {type(error).__name__}"
                _emit_safely(logging.ERROR, message, _MISSING, 2)
        elif self.log_level <= _debug_level:
            _emit_safely(logging.DEBUG, f"[Timer] {self.name} completed in {elapsed:.2f}ms", _MISSING, 2)
        return elapsed

    def __enter__(self) -> PerformanceTimer:
        return self.start()

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        self.stop(exc)

    async def __aenter__(self) -> PerformanceTimer:
        return self.start()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        self.stop(exc)

    def __call__(self, function: _F) -> _F:
        """Decorate a sync or async function; each call is timed by its own timer."""
        name, log_level = self.name, self.log_level

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with PerformanceTimer(name, log_level):
                    return await function(*args, **kwargs)

            return cast(_F, async_wrapper)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with PerformanceTimer(name, log_level):
                return function(*args, **kwargs)

        return cast(_F, wrapper)


def timing_decorator(log_level: int = DebugLevel.VERBOSE) -> Callable[[_F], _F]:
    """Time every call of the decorated (sync or async) function under its qualified name."""

    def decorate(function: _F) -> _F:
        return PerformanceTimer(getattr(function, "__qualname__", "function"), log_level)(function)

    return decorate


# ---------------------------------------------------------------------------
# Error debug files
# ---------------------------------------------------------------------------

_FILE_PREFIX = "anyclaude-error-"
_INDEX_NAME = "index.log"


class _UnsafeDirectoryError(OSError):
    """The debug directory is a symlink, not a directory, or someone else's."""


def get_debug_directory() -> str:
    """Where error files go: ``ANYCLAUDE_DEBUG_DIR`` or ``<tempdir>/anyclaude-<uid>``."""
    configured = os.environ.get(DEBUG_DIR_ENV_VAR)
    if configured:
        return os.path.abspath(configured)
    owner = os.getuid() if hasattr(os, "getuid") else (os.environ.get("USERNAME") or "user")
    return os.path.join(tempfile.gettempdir(), f"anyclaude-{owner}")


def _max_debug_files() -> int:
    raw = os.environ.get(DEBUG_MAX_FILES_ENV_VAR)
    if not raw:
        return DEFAULT_MAX_DEBUG_FILES
    try:
        return max(1, int(raw))
    except ValueError:
        _warn_once(
            f"max-files:{raw}",
            f"{DEBUG_MAX_FILES_ENV_VAR}={raw!r} is not a number; keeping {DEFAULT_MAX_DEBUG_FILES}",
        )
        return DEFAULT_MAX_DEBUG_FILES


def _open_private_directory(path: str) -> int:
    """Create or open ``path`` as a private directory and return a descriptor for it.

    Refuses a symlink, a non-directory and a directory owned by another user;
    tightens our own directory to 0700.  Working through the descriptor keeps a
    later swap of the path from redirecting the files.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if os.path.islink(path):
            raise _UnsafeDirectoryError(error.errno, "is a symlink", path) from error
        raise
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISDIR(info.st_mode):
            raise _UnsafeDirectoryError(0, "is not a directory", path)
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise _UnsafeDirectoryError(0, f"is owned by uid {info.st_uid}, not by us", path)
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(descriptor, 0o700)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _open_debug_directory() -> tuple[int, str]:
    """The configured debug directory, or when it is unsafe a fresh private one (kept for later files).

    The unsafe path is never written to; the warning names the one used instead,
    so the details of a failure are not lost to a planted symlink.
    """
    global _fallback_directory
    path = get_debug_directory()
    try:
        return _open_private_directory(path), path
    except _UnsafeDirectoryError as error:
        if _fallback_directory is None or not os.path.isdir(_fallback_directory):
            _fallback_directory = tempfile.mkdtemp(prefix="anyclaude-errors-")  # mode 0700, a new random name
        _warn_once(
            f"unsafe-debug-dir:{path}",
            f"refusing error debug directory {path} ({error.strerror}); "
            f"writing error debug files to {_fallback_directory} instead",
        )
        return _open_private_directory(_fallback_directory), _fallback_directory


def _create_private_file(directory: int, name: str, content: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(name, flags, 0o600, dir_fd=directory)
    try:
        os.fchmod(descriptor, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(descriptor, view) :]
    except BaseException:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory)
        raise
    os.close(descriptor)


def _append_to_index(directory: int, line: str) -> None:
    """Append to the bounded index of error files (rotated to ``index.log.1``)."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(_INDEX_NAME, dir_fd=directory, follow_symlinks=False).st_size > MAX_INDEX_BYTES:
            os.replace(_INDEX_NAME, f"{_INDEX_NAME}.1", src_dir_fd=directory, dst_dir_fd=directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(_INDEX_NAME, flags, 0o600, dir_fd=directory)
    try:
        os.write(descriptor, line.encode("utf-8", errors="replace"))
    finally:
        os.close(descriptor)


def _prune_old_files(directory: int, keep: int) -> None:
    """Delete all but the newest ``keep`` error files."""
    entries = []
    with os.scandir(directory) as listing:
        for entry in listing:
            if entry.name.startswith(_FILE_PREFIX) and entry.name.endswith(".json"):
                with contextlib.suppress(OSError):
                    entries.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
    entries.sort()
    for _, name in entries[: max(0, len(entries) - keep)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=directory)


def _process_facts() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "debug_level": _debug_level,
    }


def _debug_document(status_code: int, request_info: object, response_info: object) -> bytes:
    now = _dt.datetime.now().astimezone()
    document: dict[str, object] = {
        "timestamp": now.isoformat(timespec="milliseconds"),
        "status_code": status_code,
        "request_id": _request_id.get(),
        "request": request_info,
        "response": response_info,
        "process": _process_facts(),
    }
    for sanitizer in (_sanitize_for_error_file, _sanitize_for_small_error_file):
        content = json.dumps(sanitizer(document), ensure_ascii=False, indent=2).encode("utf-8", errors="replace")
        if len(content) <= MAX_DEBUG_FILE_BYTES:
            return content
    summary = {key: document[key] for key in ("timestamp", "status_code", "request_id", "process")}
    summary["note"] = f"request and response omitted: over {MAX_DEBUG_FILE_BYTES} bytes even when truncated"
    return json.dumps(_sanitize_for_small_error_file(summary), indent=2).encode("utf-8")


def write_error_debug_file(status_code: int, request_info: object, response_info: object = None) -> str | None:
    """When debugging is on, save a redacted JSON record of a failed request; return its path.

    Any status >= 400 is written.  The file is created with O_EXCL|O_NOFOLLOW,
    mode 0600, under a random name in a private 0700 directory; only the newest
    ``ANYCLAUDE_DEBUG_MAX_FILES`` (100) are kept.  An unsafe directory (a
    symlink, someone else's) is refused and a fresh private one used instead,
    named in a warning.  Returns None when debugging
    is off, the status is below 400, or the disk refuses (one warning, no
    exception).
    """
    try:
        if not _debug_level or int(status_code) < 400:
            return None
        content = _debug_document(int(status_code), request_info, response_info)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{_FILE_PREFIX}{int(status_code)}-{stamp}-{secrets.token_hex(8)}.json"
        with _file_lock:
            directory, path = _open_debug_directory()
            try:
                _create_private_file(directory, name, content)
                _append_to_index(directory, f"{stamp}\t{int(status_code)}\t{name}\n")
                _prune_old_files(directory, _max_debug_files())
            finally:
                os.close(directory)
        return os.path.join(path, name)
    except OSError as error:
        reason = error.strerror or str(error)
        _warn_once(
            f"debug-file:{get_debug_directory()}:{reason}",
            f"cannot write error debug files to {get_debug_directory()} ({reason}); details are not saved",
        )
    except Exception as error:  # noqa: BLE001 - never raise into the request that failed
        _warn_once(
            f"debug-file:{type(error).__name__}", f"error debug file not written: {type(error).__name__}: {error}"
        )
    return None


def log_debug_error(
    error_type: str, status_code: int, debug_file: str | None = None, context: Mapping[str, object] | None = None
) -> None:
    """At level >= 1 log ``<type> error (<provider>/<model>) - Debug info written to: <path>``.

    Without a file the line names the status instead.  Never raises.
    """
    if not _debug_level:
        return
    try:
        details = dict(context or {})
        where = f"{details.pop('provider', 'unknown')}/{details.pop('model', 'unknown')}"
        if debug_file:
            message = f"{error_type} error ({where}) - Debug info written to: {debug_file}"
        else:
            message = f"{error_type} error ({where}) - status {status_code}, no debug file written"
        _emit_safely(logging.ERROR, message, details if details else _MISSING, 1)
    except Exception as error:  # noqa: BLE001 - logging never raises into its caller
        _warn_once(f"log-debug-error:{type(error).__name__}", f"log_debug_error failed: {error}")


# ---------------------------------------------------------------------------
# Start-up banner
# ---------------------------------------------------------------------------


def display_debug_startup() -> None:
    """At level >= 1, log what is enabled and where error files go.  Never raises."""
    level = _debug_level
    if not level:
        return
    try:
        lines = [
            "=" * 60,
            f"ANYCLAUDE DEBUG MODE: level {level} ({DebugLevel(level).name})",
        ]
        for shown, description in _LEVEL_DESCRIPTIONS.items():
            mark = "on " if shown <= level else "off"
            lines.append(f"  [{mark}] level {int(shown)} ({shown.name}): {description}")
        lines.append(f"  Error debug files: {get_debug_directory()} (newest {_max_debug_files()} kept)")
        lines.append(f"  Log format: {_log_format}")
        lines.append("=" * 60)
        for line in lines:
            _debug_logger.info(line)
    except Exception as error:  # noqa: BLE001 - a banner is not worth a crash
        _warn_once("banner", f"debug banner not shown: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------
# Import-time set-up: the ``anyclaude`` logger and the level from the environment.
# ---------------------------------------------------------------------------

_debug_logger = _install_debug_logger()
reload_from_environment()
