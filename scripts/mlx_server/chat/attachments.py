"""Images and documents in a conversation, turned into what the model reads, within limits.

Documents are text: a text document is its text; a PDF is its text layer,
page by page (pypdf, in a child process a deadline ends: ``pdf_text``); a
PDF without one is left out like an image.  On a model that reads text only,
an image is left out too, and a short placeholder in the prompt says so, so
that a session that once attached a screenshot (Claude Code's Read tool
returns images inside tool results) goes on answering instead of failing on
every later request.  On a vision model an image becomes the model's own
image marker, in its place (the chat core then splices in its tokens); an
image given by URL is refused there (the server never reaches the network)
and left out on a text model.

What an attachment may cost is bounded (``AttachmentLimits``, from the
server's settings): its bytes, a PDF's pages, its text (no more than the
model's context could hold), the seconds reading it takes, the images one
request may bring.  Past a limit the request is refused with a sentence
naming it; a text longer than the context is a context overflow.

What was left out is counted (``Omitted``), for the response's header and a
level-1 debug line.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mlx_server.chat.text_guard import plain
from mlx_server.pdf_text import PdfTooLongError, UnreadablePdfError, read_pdf_text
from mlx_server.vocabulary import (
    ContextOverflowError,
    DocumentPart,
    ImagePart,
    InvalidRequestError,
    Message,
    Part,
    TextPart,
)

__all__ = [
    "CHARS_PER_TOKEN_BOUND",
    "IMAGE_PLACEHOLDER",
    "NOTHING_OMITTED",
    "AttachmentLimits",
    "Omitted",
    "pdf_text",
    "prepare",
]


IMAGE_PLACEHOLDER = "[an image was left out here: this model reads text only]"
UNREADABLE_DOCUMENT = "[a PDF was left out here: it has no text layer, and this model reads text only]"
URL_DOCUMENT = "[a document given by URL was left out here: the server does not fetch]"
#: Characters of a document per token of the context, at most: more text than this cannot fit, whatever it says.
CHARS_PER_TOKEN_BOUND = 16
#: Document texts remembered by content (an agent sends the same PDF with every turn), bounded in characters.
REMEMBERED_CHARS = 64 * 1024**2


@dataclass(frozen=True)
class AttachmentLimits:
    """What one request's attachments may cost (the defaults are the server's; ``settings`` declares each)."""

    max_bytes: int = 20 * 1024**2  # per image or document
    max_pdf_pages: int = 500
    max_images: int = 100  # images a vision model reads in one request
    max_image_pixels: int = 25_000_000
    seconds: float = 20.0  # reading one document


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


class _DocumentTexts:
    """PDF texts by the file's digest, the newest first out of memory last; bounded in characters (one lock)."""

    def __init__(self, max_chars: int) -> None:
        self._texts: OrderedDict[bytes, str | None] = OrderedDict()
        self._chars = 0
        self._max_chars = max_chars
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> tuple[bool, str | None]:
        with self._lock:
            if digest not in self._texts:
                return False, None
            self._texts.move_to_end(digest)
            return True, self._texts[digest]

    def put(self, digest: bytes, text: str | None) -> None:
        size = len(text or "")
        if size > self._max_chars:
            return
        with self._lock:
            if digest in self._texts:
                return
            self._texts[digest] = text
            self._chars += size
            while self._chars > self._max_chars:
                _, dropped = self._texts.popitem(last=False)
                self._chars -= len(dropped or "")


_documents = _DocumentTexts(REMEMBERED_CHARS)


def pdf_text(data: bytes, limits: AttachmentLimits = AttachmentLimits(), max_chars: int = 1 << 40) -> str | None:
    """A PDF's text layer, page by page; None when it has none (a scan).

    InvalidRequestError when it is no PDF, or cannot be read within ``limits``;
    ContextOverflowError when its text is longer than ``max_chars`` (more than
    the model's context could hold).  Remembered by digest: an agent sends
    the same PDF again with every later turn of its session.
    """
    digest = hashlib.sha256(data).digest()
    known, text = _documents.get(digest)
    if known:
        if text is not None and len(text) > max_chars:
            raise _too_long(len(text), max_chars)
        return text
    try:
        pages = read_pdf_text(data, limits.max_pdf_pages, max_chars, limits.seconds).pages
    except UnreadablePdfError as error:
        raise InvalidRequestError(str(error), "messages", "unreadable_document") from None
    except PdfTooLongError as error:
        raise _too_long(error.chars, max_chars) from None
    text = None
    if any(page.strip() for page in pages):
        text = plain("\n\n".join(f"--- page {number} ---\n{page.strip()}" for number, page in enumerate(pages, 1)))
    _documents.put(digest, text)
    return text


def _too_long(chars: int, max_chars: int) -> ContextOverflowError:
    """A document that alone needs more tokens than the context has (counted at the most characters per token)."""
    context = max(1, max_chars // CHARS_PER_TOKEN_BOUND)
    return ContextOverflowError(context, max(context + 1, chars // CHARS_PER_TOKEN_BOUND), None, "messages")


def _document_text(document: DocumentPart, limits: AttachmentLimits, max_chars: int) -> str | None:
    """The document as text (None: it has none the model could read)."""
    if document.text is not None:
        text: str | None = document.text
    elif document.data is not None and document.media_type == "application/pdf":
        text = pdf_text(document.data, limits, max_chars)
    elif document.data is not None and document.media_type.startswith("text/"):
        text = plain(document.data.decode("utf-8", errors="replace"))
        if len(text) > max_chars:
            raise _too_long(len(text), max_chars)
    else:
        return None
    if text is None:
        return None
    return f"Document: {document.title}\n{text}" if document.title else text


def _check_size(part: ImagePart | DocumentPart, limits: AttachmentLimits) -> None:
    size = len(part.data or b"")
    if size > limits.max_bytes:
        kind = "an image" if isinstance(part, ImagePart) else "a document"
        raise InvalidRequestError(
            f"{kind} of {size} bytes is larger than this server reads ({limits.max_bytes}, --max-attachment-bytes)",
            "messages",
            "attachment_too_large",
        )


def _prepared_parts(
    parts: Sequence[Part], marker: str | None, limits: AttachmentLimits, max_chars: int
) -> tuple[list[Part], Omitted, list[ImagePart]]:
    kept: list[Part] = []
    omitted = Omitted()
    images: list[ImagePart] = []
    for part in parts:
        if isinstance(part, DocumentPart):
            if part.url is not None:
                kept.append(TextPart(URL_DOCUMENT))
                omitted += Omitted(documents=1)
                continue
            _check_size(part, limits)
            text = _document_text(part, limits, max_chars)
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
                _check_size(part, limits)
                kept.append(TextPart(marker))
                images.append(part)
        else:
            kept.append(part)
    return kept, omitted, images


def prepare(
    messages: Sequence[Message],
    marker: str | None,
    limits: AttachmentLimits = AttachmentLimits(),
    context_length: int = 1 << 30,
) -> tuple[list[Message], Omitted, list[ImagePart]]:
    """The messages as text the chat template renders, what was left out, and the images in order.

    ``marker`` is what stands for one image in the text (None: the model reads
    text only, and images become placeholders).  Every message comes out as
    plain ``content``: an image is its marker, in its place.  InvalidRequestError
    past one of ``limits``; ContextOverflowError for a document longer than
    ``context_length`` tokens could hold.
    """
    prepared: list[Message] = []
    omitted = Omitted()
    images: list[ImagePart] = []
    max_chars = context_length * CHARS_PER_TOKEN_BOUND
    for message in messages:
        if not message.parts:
            prepared.append(message)
            continue
        parts, left_out, found = _prepared_parts(message.parts, marker, limits, max_chars)
        omitted += left_out
        images += found
        if marker is not None and len(images) > limits.max_images:
            raise InvalidRequestError(
                f"the conversation holds more than {limits.max_images} images, more than this server reads in one "
                "request (--max-images): leave out older screenshots",
                "messages",
                "too_many_images",
            )
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
