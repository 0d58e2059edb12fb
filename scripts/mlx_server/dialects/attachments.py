"""Images and documents as each dialect sends them: base64 data, data URLs, plain URLs, into the core's parts.

Decoding is strict: data that is not base64, or a data URL that is not one,
is a 400 naming the field (raised from the dialects' pydantic models); an
image or document given by an ``http(s)`` URL is kept as a URL, which the
chat core never fetches.
"""

from __future__ import annotations

import base64
import binascii

from mlx_server.vocabulary import DocumentPart, ImagePart

__all__ = ["decode_base64", "document_from_data", "image_from_url", "parse_data_url"]


def decode_base64(data: str) -> bytes:
    """The bytes of base64 ``data`` (ValueError when it is not base64, or empty)."""
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 data") from None
    if not decoded:
        raise ValueError("is empty")
    return decoded


def parse_data_url(url: str) -> tuple[str, bytes] | None:
    """``data:<media type>;base64,<data>``: its media type and bytes; None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError("is a data URL that is not base64 (data:<media type>;base64,<data>)")
    return header.removesuffix(";base64") or "application/octet-stream", decode_base64(payload)


def image_from_url(url: str) -> ImagePart:
    """An image given as a data URL (its bytes) or a plain URL (kept, never fetched)."""
    parsed = parse_data_url(url)
    if parsed is None:
        return ImagePart(url=url)
    media_type, data = parsed
    return ImagePart(data=data, media_type=media_type)


def document_from_data(data_url: str, title: str | None) -> DocumentPart:
    """A file given as a data URL (OpenAI's ``file_data``): a PDF or a text file."""
    parsed = parse_data_url(data_url)
    if parsed is None:
        return DocumentPart(url=data_url, title=title)
    media_type, data = parsed
    return DocumentPart(data=data, media_type=media_type, title=title)
