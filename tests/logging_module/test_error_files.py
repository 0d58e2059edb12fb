"""write_error_debug_file() and log_debug_error(): private, redacted, bounded, never an exception."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

import utils_logging
from utils_logging import log_debug_error, write_error_debug_file

from .helpers import stderr_lines

GUIDE_REQUEST = {
    "method": "POST",
    "url": "http://localhost:8081/v1/chat/completions?api_key=qs-secret-value",
    "headers": {
        "authorization": "Bearer sk-live-abcdef0123456789",
        "x-api-key": "plain-key-value",
        "cookie": "session=cookie-value-123",
        "content-type": "application/json",
    },
    "body": json.dumps({"model": "current-model", "api_key": "body-key-value", "messages": [{"role": "user"}]}),
}
SECRETS = ["abcdef0123456789", "plain-key-value", "cookie-value-123", "body-key-value", "qs-secret-value"]


def _read(path: str | None) -> dict[str, Any]:
    assert path is not None
    document = json.loads(Path(path).read_text())
    assert isinstance(document, dict)
    return document


class TestWhenWritten:
    def test_nothing_when_debugging_is_off(self, debug_dir: Path) -> None:
        """At level 0 no file and no directory are made."""
        assert write_error_debug_file(500, GUIDE_REQUEST) is None
        assert not debug_dir.exists()

    @pytest.mark.parametrize("status", [400, 401, 404, 413, 429, 500, 503])
    def test_every_error_status_is_written(self, status: int, debug_dir: Path) -> None:
        """Any status >= 400 yields a file (the original wrote nothing for 5xx)."""
        utils_logging.set_debug_level(1)
        path = write_error_debug_file(status, GUIDE_REQUEST, {"statusCode": status, "body": "boom"})
        assert _read(path)["status_code"] == status

    @pytest.mark.parametrize("status", [200, 302, 399])
    def test_success_is_not_written(self, status: int, debug_dir: Path) -> None:
        """Statuses below 400 are not errors."""
        utils_logging.set_debug_level(3)
        assert write_error_debug_file(status, GUIDE_REQUEST) is None


class TestContents:
    def test_document_shape(self, debug_dir: Path) -> None:
        """Timestamp with zone, status, request, response and process facts."""
        utils_logging.set_debug_level(1)
        with utils_logging.request_context("req_42"):
            document = _read(write_error_debug_file(500, {"method": "GET"}, {"statusCode": 500, "body": "x"}))
        stamp = datetime.datetime.fromisoformat(document["timestamp"])
        assert stamp.tzinfo is not None
        assert document["status_code"] == 500
        assert document["request"] == {"method": "GET"}
        assert document["response"] == {"statusCode": 500, "body": "x"}
        assert document["request_id"] == "req_42"
        assert document["process"]["pid"] == os.getpid()
        assert {"python", "platform"} <= document["process"].keys()

    def test_secrets_are_redacted(self, debug_dir: Path) -> None:
        """Headers, JSON bodies and query strings lose their secrets before reaching disk."""
        utils_logging.set_debug_level(3)
        path = write_error_debug_file(500, GUIDE_REQUEST, {"statusCode": 500, "body": "key sk-ant-api03-xyzxyzxyzxyz"})
        assert path is not None
        text = Path(path).read_text()
        for secret in [*SECRETS, "xyzxyzxyzxyz"]:
            assert secret not in text
        assert _read(path)["request"]["headers"]["content-type"] == "application/json"

    def test_large_bodies_are_capped(self, debug_dir: Path) -> None:
        """A huge body is truncated with a marker; the file stays under 1 MiB."""
        utils_logging.set_debug_level(1)
        path = write_error_debug_file(500, {"body": "y" * 5_000_000, "parts": ["z" * 100_000] * 50})
        assert path is not None
        assert os.path.getsize(path) <= utils_logging.MAX_DEBUG_FILE_BYTES
        assert "truncated" in Path(path).read_text()


class TestFileSecurity:
    def test_directory_and_file_are_private(self, debug_dir: Path) -> None:
        """The directory is 0700 and each file 0600, under a random name."""
        utils_logging.set_debug_level(1)
        first = write_error_debug_file(500, {})
        second = write_error_debug_file(500, {})
        assert first and second and first != second
        assert stat.S_IMODE(debug_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(first).st_mode) == 0o600

    def test_default_directory_is_per_user_in_tempdir(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without ANYCLAUDE_DEBUG_DIR files go to <tempdir>/anyclaude-<uid>."""
        monkeypatch.delenv("ANYCLAUDE_DEBUG_DIR", raising=False)
        assert utils_logging.get_debug_directory() == os.path.join(tempfile.gettempdir(), f"anyclaude-{os.getuid()}")

    def test_loose_directory_is_tightened(self, debug_dir: Path) -> None:
        """An existing directory of ours that others could read is made 0700."""
        debug_dir.mkdir(mode=0o755)
        debug_dir.chmod(0o755)
        utils_logging.set_debug_level(1)
        assert write_error_debug_file(500, {}) is not None
        assert stat.S_IMODE(debug_dir.stat().st_mode) == 0o700

    def test_symlinked_directory_is_refused_and_a_private_one_used(
        self, debug_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A symlink planted where the directory goes is not followed; the details go to a fresh 0700 directory."""
        fallback_parent = _fresh_temp_root(tmp_path, monkeypatch)
        target = tmp_path / "attacker"
        target.mkdir()
        debug_dir.symlink_to(target)
        utils_logging.set_debug_level(1)
        path = write_error_debug_file(500, GUIDE_REQUEST)
        assert list(target.iterdir()) == []
        assert path is not None and Path(path).parent.parent == fallback_parent
        assert stat.S_IMODE(Path(path).parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert _read(path)["status_code"] == 500
        warning = "\n".join(stderr_lines(capsys))
        assert f"refusing error debug directory {debug_dir}" in warning
        assert str(Path(path).parent) in warning

    def test_later_files_join_the_same_fallback_directory(
        self, debug_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _fresh_temp_root(tmp_path, monkeypatch)
        debug_dir.symlink_to(tmp_path)
        utils_logging.set_debug_level(1)
        first, second = write_error_debug_file(500, {}), write_error_debug_file(400, {})
        assert first and second and Path(first).parent == Path(second).parent

    def test_symlinked_file_is_refused(self, debug_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A symlink planted at the file's name is neither followed nor overwritten."""
        utils_logging.set_debug_level(1)
        write_error_debug_file(500, {})  # creates the directory
        monkeypatch.setattr(secrets, "token_hex", lambda _n: "predictable")
        monkeypatch.setattr(datetime, "datetime", _FrozenDatetime)
        victim = tmp_path / "victim.txt"
        victim.write_text("original")
        (debug_dir / "anyclaude-error-500-20250101T000000.000000Z-predictable.json").symlink_to(victim)
        assert write_error_debug_file(500, GUIDE_REQUEST) is None
        assert victim.read_text() == "original"

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
    def test_directory_of_another_user_is_refused(
        self, debug_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A directory owned by someone else is not used; a fresh private one is."""
        _fresh_temp_root(tmp_path, monkeypatch)
        debug_dir.mkdir(mode=0o700)
        os.chown(debug_dir, 12345, 12345)
        utils_logging.set_debug_level(1)
        path = write_error_debug_file(500, {})
        assert path is not None and Path(path).parent != debug_dir
        assert list(debug_dir.iterdir()) == []


def _fresh_temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile (where fallback directories are made) into this test's directory; forget any earlier one."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setattr(utils_logging, "_fallback_directory", None)
    return root


class _FrozenDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _FrozenDatetime:
        return cls(2025, 1, 1, tzinfo=tz or datetime.timezone.utc)


class TestBounds:
    def test_only_newest_files_are_kept(self, debug_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """ANYCLAUDE_DEBUG_MAX_FILES bounds the directory; the oldest go first."""
        monkeypatch.setenv("ANYCLAUDE_DEBUG_MAX_FILES", "5")
        utils_logging.set_debug_level(1)
        paths = [write_error_debug_file(500, {"n": n}) for n in range(8)]
        remaining = sorted(str(path) for path in debug_dir.glob("anyclaude-error-*.json"))
        assert remaining == sorted(str(path) for path in paths[-5:])

    def test_index_is_bounded(self, debug_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The index of files rotates once it passes its size bound, and is private."""
        monkeypatch.setattr(utils_logging, "MAX_INDEX_BYTES", 500)
        utils_logging.set_debug_level(1)
        for _ in range(30):
            write_error_debug_file(404, {})
        index = debug_dir / "index.log"
        assert index.stat().st_size <= 500 + 200
        assert (debug_dir / "index.log.1").exists()
        assert stat.S_IMODE(index.stat().st_mode) == 0o600


class TestFailures:
    def test_unwritable_location_gives_none_and_one_warning(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A directory that cannot be made (here: below a file) costs one warning, never an exception."""
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        monkeypatch.setenv("ANYCLAUDE_DEBUG_DIR", str(blocker / "debug"))
        utils_logging.set_debug_level(1)
        assert write_error_debug_file(500, {}) is None
        assert write_error_debug_file(500, {}) is None
        warnings = [line for line in stderr_lines(capsys) if "WARNING" in line]
        assert len(warnings) == 1 and "cannot write error debug files" in warnings[0]

    def test_unserializable_input_still_writes(self, debug_dir: Path) -> None:
        """Request info of any shape is written, not raised."""
        utils_logging.set_debug_level(1)
        recursive: list[object] = []
        recursive.append(recursive)
        assert write_error_debug_file(500, recursive, object()) is not None


class TestLogDebugError:
    def test_line_names_the_file(self, debug_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The guide's Step 5 gives ``HTTP error (mlx/current) - Debug info written to: <path>``."""
        utils_logging.set_debug_level(1)
        path = write_error_debug_file(500, GUIDE_REQUEST, {"statusCode": 500, "body": "boom"})
        log_debug_error("HTTP", 500, path, {"provider": "mlx", "model": "current"})
        (line,) = stderr_lines(capsys)
        assert line.endswith(f"ERROR: HTTP error (mlx/current) - Debug info written to: {path}")

    def test_without_a_file(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a file the line gives the status."""
        utils_logging.set_debug_level(1)
        log_debug_error("HTTP", 502, None, {"provider": "mlx"})
        assert stderr_lines(capsys)[0].endswith("HTTP error (mlx/unknown) - status 502, no debug file written")

    def test_silent_when_off(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At level 0 nothing is logged."""
        log_debug_error("HTTP", 500, "/tmp/x.json")
        assert stderr_lines(capsys) == []
