"""What the chat core reads of the server's settings, in its own words (``ServiceOptions``)."""

from __future__ import annotations

from mlx_server.chat.attachments import AttachmentLimits
from mlx_server.chat.preparation import ServiceOptions
from mlx_server.chat.thinking import server_thinking
from mlx_server.settings import Settings
from mlx_server.vocabulary import Sampling

__all__ = ["service_options"]


def service_options(settings: Settings) -> ServiceOptions:
    """The chat core's options from the server's settings (one place, for every model and the test bed)."""
    return ServiceOptions(
        default_max_tokens=settings.default_max_tokens,
        default_sampling=Sampling(
            temperature=settings.default_temperature, repetition_penalty=settings.default_repetition_penalty
        ),
        keep_billing_header=settings.keep_billing_header,
        request_timeout=settings.request_timeout,
        keepalive_interval=settings.keepalive_interval,
        strict_max_tokens=settings.strict_max_tokens,
        attachments=AttachmentLimits(
            max_bytes=settings.max_attachment_bytes,
            max_pdf_pages=settings.max_pdf_pages,
            max_images=settings.max_images,
            max_image_pixels=settings.max_image_pixels,
            seconds=settings.max_attachment_seconds,
        ),
        thinking=server_thinking(settings.thinking, settings.thinking_budget),
    )
