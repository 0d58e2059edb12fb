"""redact() and every log line: secrets by header name, by key at any depth, and by shape in text."""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import utils_logging
from utils_logging import REDACTED, debug, redact, setup_logger

SECRET_HEADERS = [
    "authorization",
    "Authorization",
    "AUTHORIZATION",
    "proxy-authorization",
    "cookie",
    "Set-Cookie",
    "x-api-key",
    "X-Api-Key",
    "api-key",
    "x-auth-token",
    "x-goog-api-key",
    "anthropic-api-key",
    "x-claude-code-session-id",  # who a client is: its sessions, threads and subagents
    "x-claude-code-agent-id",
    "session-id",
    "thread-id",
]
SECRET_KEYS = [
    "password",
    "passwd",
    "secret",
    "api_key",
    "apikey",
    "apiKey",
    "token",
    "access_token",
    "accessToken",
    "refresh_token",
    "id_token",
    "client_secret",
    "credentials",
    "private_key",
    "session",
    "session_id",
    "cookie",
    "github_token",
    "db_password",
    "OPENAI_API_KEY",
    "aws_secret_access_key",
    "password_hash",
    "user",  # client identifiers: OpenAI's user, prompt_cache_key and safety_identifier, Anthropic's user_id
    "user_id",
    "prompt_cache_key",
    "promptCacheKey",
    "safety_identifier",
    "conversation_id",
]
ORDINARY_KEYS = [
    "model",
    "max_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cache_key",
    "tokens",
    "content",
    "keys",
    "after_user",  # whether a prompt ends with the user's message, not who the user is
    "role",
    "time_to_first_token",  # positions in a token stream, not credentials
    "diverged_at_token",
    "secondsPerToken",
]

# (text containing a secret, the secret itself)
SECRET_TEXTS = [
    ("key sk-abc123def456ghi789", "sk-abc123def456ghi789"),
    ("key sk-proj-Abc_123-def456ghi789jkl", "sk-proj-Abc_123-def456ghi789jkl"),
    ("key sk-ant-api03-AbCdEf0123456789xyz", "sk-ant-api03-AbCdEf0123456789xyz"),
    ("Authorization: Bearer eyabc.def-ghi_jkl", "eyabc.def-ghi_jkl"),
    ("sent bearer abcdef1234567890", "abcdef1234567890"),
    ("google AIzaSyA1234567890abcdefghijklmnopqrstuv", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
    ("value ghp_0123456789abcdefghijABCDEFGHIJ012345", "ghp_0123456789abcdefghijABCDEFGHIJ012345"),
    ("value github_pat_11ABCDEFG0123456789_abcdefghij", "github_pat_11ABCDEFG0123456789_abcdefghij"),
    ("hf hf_abcdefghijklmnopqrstuvwxyz0123", "hf_abcdefghijklmnopqrstuvwxyz0123"),
    ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
    ("aws AKIAIOSFODNN7EXAMPLE done", "AKIAIOSFODNN7EXAMPLE"),
    (
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA75\n-----END RSA PRIVATE KEY-----", "MIIEpAIBAAKCAQEA75"),
    ("login password=hunter2!", "hunter2!"),
    ("config api_key: 'abc-123-xyz'", "abc-123-xyz"),
    ('json "token": "tok_98765"', "tok_98765"),
    ("url https://bob:s3cr3tpw@example.com/path", "s3cr3tpw"),
    ("url https://example.com/v1?key=1&token=qwerty123", "qwerty123"),
    ("header Cookie: sessionid=abcdef123456", "abcdef123456"),
]
ORDINARY_TEXTS = [
    "use max_tokens=100 and top_p=0.9",
    "the task-list has 3 items",
    "skeleton key-value store",
    "prompt_tokens: 12, completion_tokens: 4",
    "the bearer of good news",
    "2025-10-28 22:46:27 ran in 5400.50ms",
    "AIza is a short word here",
]


class TestHeaders:
    @pytest.mark.parametrize("name", SECRET_HEADERS)
    def test_secret_headers_are_redacted(self, name: str) -> None:
        """Header names are matched case-insensitively, whatever the value looks like."""
        result = redact({"headers": {name: "plain-value-123", "content-type": "application/json"}})
        assert result == {"headers": {name: REDACTED, "content-type": "application/json"}}

    def test_header_pairs_are_redacted(self) -> None:
        """Headers given as (name, value) pairs hide the secret values too."""
        result = redact([("Authorization", "Basic dXNlcjpwYXNz"), ("accept", "*/*")])
        assert result == [["Authorization", REDACTED], ["accept", "*/*"]]


class TestKeys:
    @pytest.mark.parametrize("key", SECRET_KEYS)
    def test_secret_keys_are_redacted_at_any_depth(self, key: str) -> None:
        """Denylisted keys hide their values, however deep and whatever their type."""
        data = {"outer": [{"inner": {key: {"nested": "value"}}}], key: 12345}
        assert redact(data) == {"outer": [{"inner": {key: REDACTED}}], key: REDACTED}

    @pytest.mark.parametrize("key", ORDINARY_KEYS)
    def test_ordinary_keys_are_kept(self, key: str) -> None:
        """Keys that only resemble secrets (max_tokens, cache_key) are left alone."""
        assert redact({key: 7}) == {key: 7}


class TestFreeText:
    @pytest.mark.parametrize(("text", "secret"), SECRET_TEXTS)
    def test_secret_shaped_values_are_masked_wholly(self, text: str, secret: str) -> None:
        """No part of a secret-shaped value survives, prefix included."""
        result = redact(text)
        assert isinstance(result, str)
        assert secret not in result
        assert secret[:6] not in result.replace(REDACTED, "")
        assert REDACTED in result

    @pytest.mark.parametrize("text", ORDINARY_TEXTS)
    def test_ordinary_text_is_unchanged(self, text: str) -> None:
        """Text that holds no secret is returned as it was."""
        assert redact(text) == text

    @pytest.mark.parametrize("as_bytes", [False, True])
    def test_json_bodies_are_parsed_and_scrubbed(self, as_bytes: bool) -> None:
        """A body given as JSON text or bytes is scrubbed by key, like a dict."""
        body = json.dumps({"model": "m", "api_key": "abc", "auth": {"password": "pw"}})
        result = redact(body.encode() if as_bytes else body)
        assert isinstance(result, str)
        assert json.loads(result) == {"model": "m", "api_key": REDACTED, "auth": REDACTED}

    def test_long_text_is_scrubbed_throughout(self) -> None:
        """A secret deep inside a long prompt is found."""
        text = "lorem ipsum " * 5_000 + "sk-ant-api03-deadbeefdeadbeef" + " dolor" * 1_000
        result = redact(text)
        assert isinstance(result, str) and "deadbeef" not in result


class TestLogLines:
    @pytest.mark.parametrize("level", [1, 2, 3])
    def test_debug_data_is_redacted_at_every_level(self, level: int, capsys: pytest.CaptureFixture[str]) -> None:
        """Level 3 shows everything except secrets."""
        utils_logging.set_debug_level(level)
        debug(
            1,
            "Chat request",
            {
                "headers": {"Authorization": "Bearer sk-live-0123456789abcdef"},
                "body": {"api_key": "k-9876543210", "messages": [{"content": "use sk-ant-api03-zzzzzzzzzzzz"}]},
            },
        )
        output = capsys.readouterr().err
        for secret in ("0123456789abcdef", "k-9876543210", "zzzzzzzzzzzz"):
            assert secret not in output

    def test_secret_in_the_message_is_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An f-string message is scrubbed like data."""
        utils_logging.set_debug_level(1)
        debug(1, "calling with key=sk-abcdefghijklmnop")
        assert "abcdefghijklmnop" not in capsys.readouterr().err

    def test_host_logger_lines_are_scrubbed(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Lines of a logger made by setup_logger are scrubbed too, tracebacks included."""
        logger = setup_logger("host.scrub")
        logger.info("token=%s", "tok-123456789")
        try:
            raise RuntimeError("Authorization: Bearer abcdefghijk123")
        except RuntimeError:
            logger.exception("failed")
        output = capsys.readouterr().err
        assert "tok-123456789" not in output and "abcdefghijk123" not in output
        assert "Traceback" in output


_TOKEN_CHARS = string.ascii_letters + string.digits
_body = st.text(alphabet=_TOKEN_CHARS, min_size=24, max_size=40)
_planted_token = st.one_of(
    _body.map(lambda body: f"sk-{body}"),
    _body.map(lambda body: f"sk-ant-api03-{body}"),
    _body.map(lambda body: f"Bearer {body}"),
    st.text(alphabet=_TOKEN_CHARS, min_size=35, max_size=35).map(lambda body: f"AIza{body}"),
    st.text(alphabet=_TOKEN_CHARS, min_size=36, max_size=36).map(lambda body: f"ghp_{body}"),
)
# Surrounding text has no ASCII letters or digits, so it can never spell a planted secret by chance.
_plain_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters=_TOKEN_CHARS), max_size=30
)
_json_like: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _plain_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_plain_text, children, max_size=3),
    max_leaves=10,
)


@st.composite
def _with_planted_secret(draw: st.DrawFn) -> tuple[Any, str]:
    """Arbitrary data with one secret planted: under a denylisted key, or as a token in text."""
    data = draw(_json_like)
    if draw(st.booleans()):
        secret = "planted" + draw(_body)
        planted: Any = {draw(st.sampled_from(SECRET_KEYS + SECRET_HEADERS)): secret}
    else:
        token = draw(_planted_token)
        secret = token.split(" ")[-1]
        planted = f"{draw(_plain_text)} {token} {draw(_plain_text)}"
    for _ in range(draw(st.integers(0, 3))):
        planted = draw(st.sampled_from([lambda v: [v], lambda v: {"wrapper": v}, lambda v: {"x": 1, "y": v}]))(planted)
    return [data, planted], secret


class TestPlantedSecretsNeverLeak:
    @settings(max_examples=300, deadline=None)
    @given(_with_planted_secret())
    def test_not_in_redacted_data(self, planted: tuple[Any, str]) -> None:
        """redact() output never contains a planted secret."""
        data, secret = planted
        assert secret not in json.dumps(redact(data), ensure_ascii=False)

    @settings(max_examples=150, deadline=None)
    @given(_with_planted_secret(), st.sampled_from([1, 2, 3]), st.sampled_from(["text", "json"]))
    def test_not_in_any_log_line(self, planted: tuple[Any, str], level: int, log_format: str) -> None:
        """No debug line at any level contains a planted secret, in text or JSON format."""
        data, secret = planted
        stream = io.StringIO()
        os.environ["ANYCLAUDE_LOG_FORMAT"] = log_format
        try:
            utils_logging.reload_from_environment()
            utils_logging.set_debug_level(level)
            with contextlib.redirect_stderr(stream):
                debug(1, "data", data)
        finally:
            del os.environ["ANYCLAUDE_LOG_FORMAT"]
            utils_logging.reload_from_environment()
        output = stream.getvalue()
        assert "data" in output and secret not in output
