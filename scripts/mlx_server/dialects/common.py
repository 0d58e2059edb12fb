"""What every dialect's protocol shares: strict request models, Unicode checks, ids and server-sent-event framing."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["DialectModel", "RequestBody", "new_id", "sse_data", "sse_event", "traced"]

#: A string this long in the base64 alphabet is an attachment's data (text is never this uniform).
ATTACHMENT_CHARS = 512
_BASE64 = re.compile(r"[A-Za-z0-9+/=_-]+")


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where a string holds a lone UTF-16 surrogate (JSON allows ``"\\ud800"``; UTF-8 and tokenizers do not)."""
    if isinstance(value, str):
        return None if _is_valid_unicode(value) else path or "the body"
    if isinstance(value, dict):
        if not all(_is_valid_unicode(str(key)) for key in value):
            return f"a key in {path or 'the body'}"
        items = [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}[{index}]", item) for index, item in enumerate(value)]
    else:
        return None
    for item_path, item in items:
        found = lone_surrogate_at(item, item_path)
        if found is not None:
            return found
    return None


class DialectModel(BaseModel):
    """Strict fields (a string where a number belongs is a 400, never coerced); unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class RequestBody(DialectModel):
    """A top-level request body: no lone surrogates anywhere, and an explicit null means "not given"."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode_and_no_nulls(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise ValueError(f"{where} is not valid Unicode: it contains a lone surrogate (\\ud800-\\udfff)")
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def traced(body: BaseModel) -> Any:
    """A request body as ANYCLAUDE_DEBUG=3 logs it: each attachment's data as its kind, size and digest.

    (Secrets and client identifiers are the logging module's to redact, at every level.)
    """
    return _summarized(body.model_dump(exclude_unset=True))


def _summarized(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _summarized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_summarized(item) for item in value]
    if isinstance(value, str) and len(value) >= ATTACHMENT_CHARS:
        return _attachment_summary(value) or value
    return value


def _attachment_summary(text: str) -> str | None:
    """``<image/png: 104540 bytes, sha256 3f2a…>`` for a data URL or a base64 payload; None for other text."""
    kind = "base64 data"
    payload = text
    if text.startswith("data:"):
        header, _, payload = text[5:].partition(",")
        kind = header.removesuffix(";base64") or kind
    if not _BASE64.fullmatch(payload):
        return None
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=False)
    except (binascii.Error, ValueError):
        return None
    return f"<{kind}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…>"


def new_id(prefix: str, hex_digits: int = 24) -> str:
    return f"{prefix}{secrets.token_hex(hex_digits // 2)}"


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def sse_data(body: dict[str, Any]) -> bytes:
    """One server-sent event with data only (OpenAI chat completions)."""
    return b"data: " + _json(body) + b"\n\n"


def sse_event(name: str, body: dict[str, Any]) -> bytes:
    """One named server-sent event (Anthropic messages, OpenAI responses)."""
    return b"event: " + name.encode() + b"\ndata: " + _json(body) + b"\n\n"
