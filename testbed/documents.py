"""Attachments for tests and benches: PDFs with a text layer (or none, like a scan), small PNG screenshots,
and the hostile ones a careless or malicious client sends.

The PDF is written object by object with a correct cross-reference table,
so pypdf reads it the way it reads a real one; each page shows its text in
Helvetica.  The PNG comes from Pillow (mlx-vlm's own image library).  The
hostile ones: pages that share one content stream of many text operators
(seconds of pypdf per page), a deeply nested ``TJ`` array (a RecursionError),
a Flate bomb, and a tiny PNG that declares a huge size.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

__all__ = [
    "data_url",
    "flate_bomb_pdf",
    "huge_declared_png",
    "nested_pdf",
    "pdf",
    "pdf_of_content",
    "png",
    "screenshot",
    "shared_stream_pdf",
]


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def pdf(pages: list[str]) -> bytes:
    """A PDF with one page per text; an empty string makes a page without text (what a scan reads as)."""
    count = len(pages)
    page_ids = [4 + 2 * index for index in range(count)]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{i} 0 R' for i in page_ids)}] /Count {count} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for page_id, text in zip(page_ids, pages, strict=True):
        lines = text.splitlines()
        shown = "".join(f"({_escaped(line)}) Tj T* " for line in lines)
        content = f"BT /F1 12 Tf 14 TL 72 720 Td {shown}ET".encode() if lines else b""
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {page_id + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def pdf_of_content(content: bytes, pages: int = 1) -> bytes:
    """A PDF whose ``pages`` all draw one Flate-compressed content stream."""
    data = zlib.compress(content)
    page_ids = [5 + index for index in range(pages)]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{i} 0 R' for i in page_ids)}] /Count {pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
    ]
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents 4 0 R >>")  # fmt: skip
    objects += [page] * pages
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def shared_stream_pdf(pages: int = 20, operators: int = 200_000) -> bytes:
    """A few kilobytes whose every page draws one stream of ``operators`` text operators (seconds of pypdf each)."""
    return pdf_of_content(b"BT /F1 12 Tf " + b"(xy) Tj " * operators + b"ET", pages)


def nested_pdf(depth: int = 5_000) -> bytes:
    """A ``TJ`` array nested ``depth`` deep: reading it recurses until Python stops it."""
    return pdf_of_content(b"BT /F1 12 Tf " + b"[" * depth + b"(x)" + b"]" * depth + b" TJ ET")


def flate_bomb_pdf(inflated: int = 200_000_000) -> bytes:
    """A content stream of ``inflated`` bytes that compresses to a few hundred kilobytes."""
    return pdf_of_content(b"BT (" + b"a" * inflated + b") Tj ET")


def huge_declared_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A small PNG of coloured noise (a stand-in for a screenshot)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def screenshot(width: int = 1280, height: int = 800, seed: int = 0) -> bytes:
    """A PNG that compresses as a screenshot does: a light page with lines of dark "text" of random lengths."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for top in range(16, height - 16, 18):
        left = 16 + 24 * int(rng.integers(0, 4))
        right = min(width - 16, left + int(rng.integers(80, width - 64)))
        draw.rectangle((left, top, right, top + 9), fill=tuple(int(value) for value in rng.integers(0, 90, 3)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
