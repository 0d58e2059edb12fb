"""The attachment readers take anything a client sends: a sentence for what they cannot read, never a crash.

Properties over arbitrary and mutated bytes (hypothesis, derandomized in CI),
and the hostile files a careless or malicious client sends: pages sharing
one content stream of many operators, a nested ``TJ`` array, a Flate bomb, a
PNG declaring 20000x20000 pixels, formats Pillow should not open.  Then the
same files through the real application (the scripted engine), in every
dialect: a 400 in the dialect's shape, and the server goes on answering.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_server.chat.attachments import AttachmentLimits, pdf_text
from mlx_server.model.vision import open_image
from mlx_server.vocabulary import ContextOverflowError, InvalidRequestError
from testbed.documents import flate_bomb_pdf, huge_declared_png, nested_pdf, pdf, png, shared_stream_pdf

from .helpers import CHAT, MESSAGES
from .scripted import scripted_server

QUICK = AttachmentLimits(seconds=2.0)
PROPERTIES = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with a few bytes changed, cut short, or with bytes inserted."""
    return st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8).flatmap(
        lambda changes: st.integers(1, len(data)).map(lambda end: _changed(data, changes)[:end])
    )


def _changed(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    changed = bytearray(data)
    for at, value in changes:
        changed[at] = value
    return bytes(changed)


class TestThePdfReader:
    @PROPERTIES
    @given(st.one_of(st.binary(max_size=2048), mutated(pdf(["A page of text.", "Another page."]))))
    def test_any_bytes_are_text_nothing_or_a_sentence(self, data: bytes) -> None:
        try:
            text = pdf_text(data, QUICK)
        except (InvalidRequestError, ContextOverflowError):
            return
        assert text is None or isinstance(text, str)

    @pytest.mark.parametrize(
        ("document", "said"),
        [
            (shared_stream_pdf, "took longer than 2s"),
            (nested_pdf, "nests too deeply"),
            (flate_bomb_pdf, "not a readable PDF"),
            (lambda: b"%PDF-1.4 nothing after", "not a readable PDF"),
        ],
        ids=["shared content stream", "nested TJ", "Flate bomb", "truncated"],
    )
    def test_hostile_pdfs_are_a_sentence(self, document: Callable[[], bytes], said: str) -> None:
        """(Each document is written when its test runs: the Flate bomb takes seconds, not to be paid at
        collection in every worker.)"""
        with pytest.raises(InvalidRequestError, match=said):
            pdf_text(document(), QUICK)

    def test_more_pages_than_allowed_are_refused_before_they_are_read(self) -> None:
        with pytest.raises(InvalidRequestError, match="--max-pdf-pages"):
            pdf_text(pdf(["one", "two", "three"]), AttachmentLimits(max_pdf_pages=2))

    def test_a_text_longer_than_the_context_could_hold_is_an_overflow(self) -> None:
        with pytest.raises(ContextOverflowError):
            pdf_text(pdf(["word " * 400]), QUICK, max_chars=100)


class TestTheImageReader:
    @PROPERTIES
    @given(st.one_of(st.binary(max_size=2048), mutated(png(16, 12))))
    def test_any_bytes_are_an_image_or_a_sentence(self, data: bytes) -> None:
        try:
            image = open_image(data, 1_000_000)
        except InvalidRequestError:
            return
        assert image.mode == "RGB"

    def test_a_huge_declared_size_is_refused_from_the_header(self) -> None:
        with pytest.raises(InvalidRequestError, match="--max-image-pixels") as refused:
            open_image(huge_declared_png(), 25_000_000)
        assert refused.value.code == "image_too_large"

    @pytest.mark.parametrize("image_format", ["BMP", "TIFF", "ICO"])
    def test_formats_other_than_png_jpeg_webp_and_gif_are_refused(self, image_format: str) -> None:
        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, format=image_format)
        with pytest.raises(InvalidRequestError, match="PNG, JPEG, WEBP or GIF"):
            open_image(out.getvalue(), 1_000_000)

    def test_eps_is_never_handed_to_ghostscript(self) -> None:
        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
        with pytest.raises(InvalidRequestError):
            open_image(eps, 1_000_000)


def document_block(data: bytes) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    return {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": encoded}}


@pytest.mark.parametrize("document", [shared_stream_pdf, nested_pdf, flate_bomb_pdf],
                         ids=["shared content stream", "nested TJ", "Flate bomb"])  # fmt: skip
def test_hostile_pdfs_through_the_server_are_400s_and_it_goes_on(document: Callable[[], bytes]) -> None:
    from mlx_server.settings import Settings

    server = scripted_server(Settings(default_temperature=0.0, response_cache_size=0, max_attachment_seconds=2))
    content = [document_block(document()), {"type": "text", "text": "Summarize it."}]
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    for path in (MESSAGES, "/v1/messages/count_tokens"):
        response = server.client.post(path, json=body)
        assert response.status_code == 400 and response.json()["type"] == "error", response.text
        assert "Traceback" not in response.text
    chat = server.client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert chat.status_code == 200
