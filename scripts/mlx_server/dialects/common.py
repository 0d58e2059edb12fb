"""What every dialect's protocol shares: strict request models, Unicode checks, ids and server-sent-event framing."""

from __future__ import annotations

import json
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["DialectModel", "RequestBody", "new_id", "sse_data", "sse_event"]


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
