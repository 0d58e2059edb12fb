"""A PDF's text layer, read in a child process that a deadline can end: a hostile PDF costs the server nothing.

pypdf is pure Python: a few kilobytes of PDF whose pages share one content
stream of many text operators took seconds of CPU per page, a deeply nested
``TJ`` array recursed until Python gave up, and a Flate bomb inflated until
pypdf's own limit.  In the server's process any of these would hold the GIL
the event loop needs and the memory the models need.  So each PDF is read in
a fresh child of a fork server (``multiprocessing``, preloaded with pypdf
alone: a fork costs milliseconds), which reads at most ``max_pages`` pages
and ``max_chars`` characters, and is killed when ``seconds`` pass.  Whatever
goes wrong comes back as one ``UnreadablePdfError`` sentence; nothing pypdf
raises reaches the caller.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["CHILD_MEMORY_BYTES", "PdfText", "PdfTooLongError", "UnreadablePdfError", "read_pdf_text"]

#: What a reading child may allocate (where the system enforces it): a bomb ends the child, not the server.
CHILD_MEMORY_BYTES = 2 * 1024**3
#: A page's content stream larger than this is refused before pypdf parses it (parsing alone costs ~1 s per MB).
MAX_PAGE_CONTENT_BYTES = 4 * 1024**2

OUT_OF_MEMORY = "the PDF could not be read: reading it ran out of the memory allowed for it"

_start_lock = threading.Lock()
_context: Any = None


class UnreadablePdfError(ValueError):
    """The data is not a PDF this server can read in its limits; the message says why, for the client."""


class PdfTooLongError(ValueError):
    """The text layer is longer than the caller can use: ``chars`` characters were read before stopping."""

    def __init__(self, chars: int) -> None:
        super().__init__(f"the PDF's text is longer than {chars} characters")
        self.chars = chars


@dataclass(frozen=True)
class PdfText:
    """Each page's text, in order (empty strings for pages without any)."""

    pages: tuple[str, ...]


def read_pdf_text(data: bytes, max_pages: int, max_chars: int, seconds: float) -> PdfText:
    """The PDF's text, page by page; ``UnreadablePdfError`` or ``PdfTooLongError`` otherwise (never what pypdf
    raises)."""
    parent, child = _multiprocessing().Pipe(duplex=False)
    process = _multiprocessing().Process(
        target=_read_in_child, args=(child, data, max_pages, max_chars), name="mlx-pdf-text", daemon=True
    )
    try:
        process.start()
        child.close()
        if not parent.poll(seconds):
            raise UnreadablePdfError(
                f"reading the PDF took longer than {seconds:g}s (--max-attachment-seconds): it is too complex to "
                "read here; send its text instead"
            )
        try:
            kind, value = parent.recv()
        except EOFError:  # the child died: a memory limit, a crash in a decompressor
            raise UnreadablePdfError(
                "the PDF could not be read: reading it ran out of the memory allowed for it"
            ) from None
    finally:
        if process.is_alive():
            process.kill()
        with contextlib.suppress(ValueError, OSError):
            process.join(timeout=5)
            process.close()
        parent.close()
    if kind == "text":
        return PdfText(tuple(value))
    if kind == "too long":
        raise PdfTooLongError(int(value))
    raise UnreadablePdfError(str(value))


def _multiprocessing() -> Any:
    """The fork server's context, started once with pypdf preloaded (nothing of the server's own state)."""
    global _context
    with _start_lock:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(["__main__", "pypdf", __name__])
        return _context


def _read_in_child(connection: Connection, data: bytes, max_pages: int, max_chars: int) -> None:
    """In the child: read, and send one ``(kind, value)`` back; every failure is a sentence."""
    _limit_memory(CHILD_MEMORY_BYTES)
    sys.setrecursionlimit(2000)
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)  # its warnings about broken files are the sentence below
    try:
        result: tuple[str, Any] = _read(data, max_pages, max_chars)
    except RecursionError:
        result = ("unreadable", "the PDF could not be read: its content nests too deeply")
    except MemoryError:
        result = ("unreadable", OUT_OF_MEMORY)
    except Exception as error:  # noqa: BLE001 - pypdf raises many kinds; each becomes the client's sentence
        result = ("unreadable", f"a document is not a readable PDF ({type(error).__name__}: {str(error)[:200]})")
    connection.send(result)
    connection.close()


def _read(data: bytes, max_pages: int, max_chars: int) -> tuple[str, Any]:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    count = len(reader.pages)
    if count > max_pages:
        return "unreadable", (
            f"the PDF has {count} pages, more than this server reads ({max_pages}, --max-pdf-pages): send the "
            "pages that matter"
        )
    pages: list[str] = []
    total = 0
    for page in reader.pages:
        contents = page.get_contents()
        size = len(contents.get_data()) if contents is not None else 0
        if size > MAX_PAGE_CONTENT_BYTES:
            return "unreadable", (
                f"page {len(pages) + 1} of the PDF draws {size} bytes of content, more than this server reads "
                f"({MAX_PAGE_CONTENT_BYTES}); send its text instead"
            )
        text = page.extract_text() or ""
        total += len(text)
        if total > max_chars:
            return "too long", total
        pages.append(text)
    return "text", pages


def _limit_memory(limit: int) -> None:
    """Cap the child's address space where the system supports it (Linux does; macOS ignores it)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        wanted = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
