"""Images and documents in a conversation, turned into what the model reads.

Documents are text: a text document is its text; a PDF is its text layer,
page by page (pypdf); a PDF without one is left out like an image.  On a
model that reads text only, an image is left out too, and a short
placeholder in the prompt says so, so that a session that once attached a
screenshot (Claude Code's Read tool returns images inside tool results) goes
on answering instead of failing on every later request.  On a vision model
an image becomes the model's own image marker, in its place (the chat core
then splices in its tokens); an image given by URL is refused there (the
server never reaches the network) and left out on a text model.

What was left out is counted (``Omitted``), for the response's header and a
level-1 debug line.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mlx_server.vocabulary import DocumentPart, ImagePart, InvalidRequestError, Message, Part, TextPart

__all__ = ["IMAGE_PLACEHOLDER", "NOTHING_OMITTED", "Omitted", "pdf_text", "prepare"]


IMAGE_PLACEHOLDER = "[an image was left out here: this model reads text only]"
UNREADABLE_DOCUMENT = "[a PDF was left out here: it has no text layer, and this model reads text only]"
URL_DOCUMENT = "[a document given by URL was left out here: the server does not fetch]"


@dataclass(frozen=True)
class Omitted:
    """What the prompt left out: images, and documents without text."""

    images: int = 0
    documents: int = 0

    def __bool__(self) -> bool:
        return bool(self.images or self.documents)

    def __add__(self, other: Omitted) -> Omitted:
        return Omitted(self.images + other.images, self.documents + other.documents)

    def describe(self) -> str:
        """``2 images, 1 document``: for the response's header."""
        counts = [(self.images, "image"), (self.documents, "document")]
        return ", ".join(f"{count} {noun}{'s' if count != 1 else ''}" for count, noun in counts if count)


NOTHING_OMITTED = Omitted()


def pdf_text(data: bytes) -> str | None:
    """A PDF's text layer, page by page; None when it has none (a scan). InvalidRequestError if it is no PDF.

    Remembered by digest: an agent sends the same PDF again with every later turn of its session.
    """
    digest = hashlib.sha256(data).digest()
    with _read_lock:
        if digest in _read:
            _read.move_to_end(digest)
            return _read[digest]
    text = _pdf_text_of(data)
    with _read_lock:
        _read[digest] = text
        while len(_read) > _PDFS_REMEMBERED:
            _read.popitem(last=False)
    return text


_PDFS_REMEMBERED = 64
_read: OrderedDict[bytes, str | None] = OrderedDict()
_read_lock = threading.Lock()


def _pdf_text_of(data: bytes) -> str | None:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        pages = [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages]
    except (PdfReadError, ValueError, OSError, KeyError) as error:
        raise InvalidRequestError(f"a document is not a readable PDF ({error})", "messages") from error
    if not any(text.strip() for text in pages):
        return None
    return "\n\n".join(f"--- page {number} ---\n{text.strip()}" for number, text in enumerate(pages, 1))


def _document_text(document: DocumentPart) -> str | None:
    """The document as text (None: it has none the model could read)."""
    if document.text is not None:
        text: str | None = document.text
    elif document.data is not None and document.media_type == "application/pdf":
        text = pdf_text(document.data)
    elif document.data is not None and document.media_type.startswith("text/"):
        text = document.data.decode("utf-8", errors="replace")
    else:
        return None
    if text is None:
        return None
    return f"Document: {document.title}\n{text}" if document.title else text


def _prepared_parts(parts: Sequence[Part], marker: str | None) -> tuple[list[Part], Omitted, list[ImagePart]]:
    kept: list[Part] = []
    omitted = Omitted()
    images: list[ImagePart] = []
    for part in parts:
        if isinstance(part, DocumentPart):
            if part.url is not None:
                kept.append(TextPart(URL_DOCUMENT))
                omitted += Omitted(documents=1)
                continue
            text = _document_text(part)
            if text is None:
                if part.media_type != "application/pdf":
                    unsupported = f"documents of type {part.media_type} are not supported: send text or a PDF"
                    raise InvalidRequestError(unsupported, "messages")
                kept.append(TextPart(UNREADABLE_DOCUMENT))
                omitted += Omitted(documents=1)
            else:
                kept.append(TextPart(text))
        elif isinstance(part, ImagePart):
            if marker is None:
                kept.append(TextPart(IMAGE_PLACEHOLDER))
                omitted += Omitted(images=1)
            elif part.data is None:
                raise InvalidRequestError(
                    f"an image is given by URL ({(part.url or '')[:80]}): the server does not fetch; send the "
                    "image's data (base64) instead",
                    "messages",
                    "image_url_not_fetched",
                )
            else:
                kept.append(TextPart(marker))
                images.append(part)
        else:
            kept.append(part)
    return kept, omitted, images


def prepare(messages: Sequence[Message], marker: str | None) -> tuple[list[Message], Omitted, list[ImagePart]]:
    """The messages as text the chat template renders, what was left out, and the images in order.

    ``marker`` is a vision model's text for one image (None: the model reads
    text only, and images become placeholders).  Every message comes out as
    plain ``content``: an image is its marker, in its place.
    """
    prepared: list[Message] = []
    omitted = Omitted()
    images: list[ImagePart] = []
    for message in messages:
        if not message.parts:
            prepared.append(message)
            continue
        parts, left_out, found = _prepared_parts(message.parts, marker)
        omitted += left_out
        images += found
        text = _joined((part.text for part in parts if isinstance(part, TextPart)), marker)
        prepared.append(replace(message, content=text, parts=()))
    return prepared, omitted, images


def _joined(texts: Iterable[str], marker: str | None) -> str:
    """Text pieces as one string: a newline between pieces unless one already ends in whitespace.

    An image's marker touches its neighbours, as the model's template writes an image beside text.
    """
    joined = ""
    previous = None
    for text in texts:
        glued = not joined or joined[-1].isspace() or marker in (text, previous)
        joined += text if glued else "\n" + text
        previous = text
    return joined
