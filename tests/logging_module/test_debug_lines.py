"""debug() and its helpers: the guide's line format, level gating, any data, never an exception."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import logging
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import utils_logging
from utils_logging import debug, log_cache_hit, log_cache_miss, log_performance

from .helpers import LINE, data_of, stderr_lines


class TestLineFormat:
    def test_compact_json_below_trace(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Below level 3 the data follows the message as compact JSON on one line."""
        utils_logging.set_debug_level(1)
        debug(1, "Cache put", {"key": "abc", "size_kb": 1.2, "cache_size": 0})
        (line,) = stderr_lines(capsys)
        match = LINE.match(line)
        assert match and match.group(2) == "anyclaude" and match.group(3) == "DEBUG"
        assert match.group(4) == 'Cache put {"key":"abc","size_kb":1.2,"cache_size":0}'

    def test_pretty_json_at_trace(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At level 3 the data is pretty-printed with an indent of 2."""
        utils_logging.set_debug_level(3)
        debug(3, "Chat request", {"model": "qwen", "temperature": 0.7})
        output = capsys.readouterr().err
        assert output.endswith('Chat request {\n  "model": "qwen",\n  "temperature": 0.7\n}\n')

    def test_message_without_data(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without data the line is the message alone."""
        utils_logging.set_debug_level(1)
        debug(1, "Processing request")
        (line,) = stderr_lines(capsys)
        assert line.endswith("] [anyclaude] DEBUG: Processing request")

    def test_none_is_data(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An explicit None is shown as null, unlike no data at all."""
        utils_logging.set_debug_level(1)
        debug(1, "value", None)
        (line,) = stderr_lines(capsys)
        assert line.endswith("DEBUG: value null")

    def test_caller_location_is_the_call_site(self) -> None:
        """Records carry the caller's file and line, not utils_logging's."""
        records: list[logging.LogRecord] = []

        class Recorder(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        handler = Recorder()
        logger = logging.getLogger("anyclaude")
        logger.addHandler(handler)
        try:
            utils_logging.set_debug_level(1)
            debug(1, "here")
            expected_line = sys._getframe().f_lineno - 1
        finally:
            logger.removeHandler(handler)
        assert records[0].pathname == __file__
        assert records[0].lineno == expected_line

    def test_works_without_any_set_up(self) -> None:
        """The anyclaude logger prints with no setup_logger() call (the original dropped lines)."""
        result = subprocess.run(
            [sys.executable, "-c", "import utils_logging as u; u.debug(1, 'hello', {'n': 1})"],
            cwd=Path(utils_logging.__file__).parent,
            env={**os.environ, "ANYCLAUDE_DEBUG": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stderr.rstrip().endswith('[anyclaude] DEBUG: hello {"n":1}')


class TestLevelGating:
    @pytest.mark.parametrize(
        ("current", "line_level", "shown"),
        [(0, 1, False), (0, 3, False), (0, 0, False), (1, 1, True), (1, 2, False), (2, 1, True), (3, 3, True)],
    )
    def test_shown_only_at_or_above_its_level(
        self, current: int, line_level: int, shown: bool, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """debug(n) prints when the level is at least n, and never when debugging is off."""
        utils_logging.set_debug_level(current)
        debug(line_level, "gated")
        assert bool(stderr_lines(capsys)) is shown

    def test_lazy_data_is_evaluated_only_when_shown(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A zero-argument callable is called only if the line is written."""
        calls: list[int] = []

        def expensive() -> dict[str, int]:
            calls.append(1)
            return {"answer": 42}

        utils_logging.set_debug_level(1)
        debug(2, "skipped", expensive)
        assert calls == []
        debug(1, "shown", expensive)
        assert calls == [1]
        assert data_of(stderr_lines(capsys)[0], "shown") == {"answer": 42}

    def test_lazy_data_that_raises_is_reported(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A failing lazy value becomes a note in the line, not an exception."""

        def broken() -> object:
            raise RuntimeError("no data today")

        utils_logging.set_debug_level(1)
        debug(1, "lazy", broken)
        assert data_of(stderr_lines(capsys)[0], "lazy") == "<lazy data raised RuntimeError: no data today>"


class _Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class _Point:
    x: int
    y: float


class _BadRepr:
    def __repr__(self) -> str:
        raise ValueError("repr exploded")


class _BadStr:
    def __str__(self) -> str:
        raise ValueError("str exploded")

    def __repr__(self) -> str:
        raise ValueError("repr exploded too")


def _recursive_list() -> list[object]:
    items: list[object] = [1]
    items.append(items)
    return items


def _recursive_dict() -> dict[str, object]:
    mapping: dict[str, object] = {"name": "loop"}
    mapping["self"] = mapping
    return mapping


def _deep(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def _generator() -> Iterator[int]:
    yield 1


ANY_DATA: list[tuple[str, object, object]] = [
    ("dict", {"a": 1}, {"a": 1}),
    ("list", [1, "two", None], [1, "two", None]),
    ("str", "plain text", "plain text"),
    ("bytes", b"raw \xff bytes", "raw \ufffd bytes"),
    ("bytearray", bytearray(b"abc"), "abc"),
    ("dataclass", _Point(1, 2.5), {"x": 1, "y": 2.5}),
    ("datetime", datetime.datetime(2025, 10, 28, 22, 46, 27), "2025-10-28T22:46:27"),
    ("date", datetime.date(2025, 10, 28), "2025-10-28"),
    ("timedelta", datetime.timedelta(seconds=1.5), 1.5),
    ("set", {3, 1, 2}, [1, 2, 3]),
    ("unorderable set", {1, "a"}, None),
    ("path", PurePosixPath("/tmp/x.json"), "/tmp/x.json"),
    ("exception", ValueError("bad value"), {"type": "ValueError", "message": "bad value"}),
    ("enum", _Colour.RED, "red"),
    ("decimal", decimal.Decimal("1.10"), "1.10"),
    ("uuid", uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    ("bad repr", _BadRepr(), "<unrepresentable _BadRepr>"),
    ("bad str key", {_BadStr(): 1}, {"<unrepresentable _BadStr>": 1}),
    ("recursive list", _recursive_list(), [1, "<recursion>"]),
    ("recursive dict", _recursive_dict(), {"name": "loop", "self": "<recursion>"}),
    ("nan", math.nan, "nan"),
    ("infinity", [math.inf, -math.inf], ["inf", "-inf"]),
    ("huge int", 10**5000, "<integer too large>"),
    ("tuple keys", {(1, 2): "pair"}, {"(1, 2)": "pair"}),
    ("bool and none", [True, False, None], [True, False, None]),
    ("generator", _generator(), None),
    ("class", int, "<class 'int'>"),
]


class TestAnyData:
    @pytest.mark.parametrize(("kind", "data", "expected"), ANY_DATA, ids=[row[0] for row in ANY_DATA])
    @pytest.mark.parametrize("level", [1, 3])
    def test_rendered_as_valid_json(
        self, kind: str, data: object, expected: object, level: int, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every kind of value becomes valid JSON on the line; none raises."""
        utils_logging.set_debug_level(level)
        debug(1, "data", data)
        output = capsys.readouterr().err
        rendered = json.loads(output.split("DEBUG: data ", 1)[1])
        if expected is not None:
            assert rendered == expected

    def test_deep_nesting_is_cut_with_a_marker(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nesting past the depth limit is shown as a marker, without a RecursionError."""
        utils_logging.set_debug_level(1)
        debug(1, "deep", _deep(5_000))
        assert "<max depth>" in capsys.readouterr().err

    def test_long_data_is_truncated_below_trace(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Below level 3, long data is cut with a marker that says how much went."""
        utils_logging.set_debug_level(2)
        debug(1, "big", {"text": "x" * 10_000})
        (line,) = stderr_lines(capsys)
        assert len(line) < 2_200
        assert "…[truncated " in line and " chars]" in line

    def test_long_data_is_whole_at_trace(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At level 3 nothing is cut."""
        utils_logging.set_debug_level(3)
        debug(1, "big", {"text": "x" * 10_000})
        output = capsys.readouterr().err
        assert "x" * 10_000 in output and "truncated" not in output

    def test_a_huge_string_is_cut_at_trace_and_says_so(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An attachment's base64 at level 3 (a 104,540-character line once): cut, with a marker."""
        utils_logging.set_debug_level(3)
        debug(1, "big", {"data": "A" * 104_540})
        output = capsys.readouterr().err
        assert "A" * utils_logging.MAX_TRACE_STRING_CHARS in output and "A" * 104_540 not in output
        assert "…[truncated " in output

    def test_no_line_passes_the_bound_at_trace(self, capsys: pytest.CaptureFixture[str]) -> None:
        utils_logging.set_debug_level(3)
        debug(1, "many", [f"item {index} " * 10 for index in range(20_000)])
        (line,) = [line for line in capsys.readouterr().err.split("\n[") if line]
        assert len(line) < utils_logging.MAX_LINE_CHARS + 200 and "…[truncated " in line

    def test_many_items_are_cut_below_trace(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Huge containers are not walked in full below level 3."""
        utils_logging.set_debug_level(1)
        debug(1, "many", list(range(1_000_000)))
        assert "more items" in capsys.readouterr().err

    def test_caller_data_is_not_modified(self) -> None:
        """Redaction works on a copy."""
        data = {"password": "hunter2", "nested": {"token": "abc"}}
        utils_logging.set_debug_level(3)
        debug(1, "copy", data)
        assert data == {"password": "hunter2", "nested": {"token": "abc"}}

    @settings(max_examples=300, deadline=None)
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.text()
            | st.binary(),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=10) | st.integers(), children, max_size=4)
                | st.tuples(children, children)
                | st.frozensets(st.integers(), max_size=3)
            ),
            max_leaves=25,
        ),
        st.sampled_from([1, 2, 3]),
    )
    def test_arbitrary_data_never_raises(self, data: Any, level: int) -> None:
        """Whatever the data, debug() returns normally and redact() returns JSON-serializable data."""
        utils_logging.set_debug_level(level)
        debug(1, "fuzz", data)
        json.dumps(utils_logging.redact(data), allow_nan=False)


class TestNeverRaises:
    @pytest.mark.parametrize("level", ["2", None, object()], ids=["text", "none", "object"])
    def test_a_level_that_is_not_a_number_is_a_warning_not_an_exception(
        self, level: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The caller goes on; the line is dropped and one warning names the odd level."""
        monkeypatch.setattr(utils_logging, "_warned", set())  # warnings are said once per process
        utils_logging.set_debug_level(3)
        debug(level, "odd level")
        err = capsys.readouterr().err
        assert "odd level" not in err
        assert "debug() called with an invalid level" in err

    def test_a_fractional_level_is_compared_as_a_number(self, capsys: pytest.CaptureFixture[str]) -> None:
        utils_logging.set_debug_level(2)
        debug(1.5, "between one and two")  # type: ignore[arg-type]
        debug(2.5, "above two")  # type: ignore[arg-type]
        err = capsys.readouterr().err
        assert "between one and two" in err and "above two" not in err

    def test_message_that_cannot_be_stringified(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A message whose __str__ and __repr__ raise still gives a line."""
        utils_logging.set_debug_level(1)
        debug(1, _BadStr())
        assert "<unrepresentable _BadStr>" in capsys.readouterr().err

    def test_broken_handler_does_not_raise(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A handler whose emit() raises costs one warning, not an exception; the other handlers still write."""

        class Exploding(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                raise OSError("disk gone")

        monkeypatch.setattr(utils_logging, "_warned", set())
        logger = logging.getLogger("anyclaude")
        handler = Exploding()
        logger.addHandler(handler)
        try:
            utils_logging.set_debug_level(1)
            debug(1, "still fine")
            debug(1, "and again")
        finally:
            logger.removeHandler(handler)
        lines = stderr_lines(capsys)
        assert any(line.endswith("DEBUG: still fine") for line in lines)
        assert any(line.endswith("DEBUG: and again") for line in lines)
        assert len([line for line in lines if "a debug line was dropped: OSError: disk gone" in line]) == 1


class TestCacheHelpers:
    def test_hit_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A hit shows the cache type, the key and its metadata."""
        utils_logging.set_debug_level(1)
        log_cache_hit("prompt", "abc123", {"age_seconds": 1.5, "tokens": 42})
        (line,) = stderr_lines(capsys)
        assert line.endswith('DEBUG: [Cache] HIT - prompt: abc123 {"age_seconds":1.5,"tokens":42}')

    def test_miss_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A miss shows the reason in parentheses."""
        utils_logging.set_debug_level(1)
        log_cache_miss("prompt", "abc123", "cache_miss")
        (line,) = stderr_lines(capsys)
        assert line.endswith("DEBUG: [Cache] MISS - prompt: abc123 (cache_miss)")

    def test_long_key_is_a_stable_digest(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A whole prompt as key is shown as a short digest, the same every time, never in full."""
        prompt = "You are a helpful coding agent. " * 100
        utils_logging.set_debug_level(1)
        log_cache_miss("prompt", prompt)
        log_cache_hit("prompt", prompt)
        first, second = stderr_lines(capsys)
        digest = first.split("prompt: ", 1)[1]
        assert digest.startswith("sha256:") and len(digest) < 40
        assert second.endswith(digest)
        assert "helpful coding agent" not in first + second

    def test_silent_when_debugging_is_off(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At level 0 neither helper prints."""
        log_cache_hit("prompt", "k", {"tokens": 1})
        log_cache_miss("prompt", "k", "cold")
        assert stderr_lines(capsys) == []


class TestPerformanceHelper:
    def test_shown_at_verbose(self, capsys: pytest.CaptureFixture[str]) -> None:
        """log_performance prints at level 2 with two decimals and its details."""
        utils_logging.set_debug_level(2)
        log_performance("prefill", 12.345, {"tokens": 362})
        (line,) = stderr_lines(capsys)
        assert line.endswith('DEBUG: [Perf] prefill: 12.35ms {"tokens":362}')

    def test_hidden_below_verbose(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At level 1 performance lines are not shown."""
        utils_logging.set_debug_level(1)
        log_performance("prefill", 1.0)
        assert stderr_lines(capsys) == []
