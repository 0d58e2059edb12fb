"""What the machine has, for defaults that fit it."""

from __future__ import annotations

import os

__all__ = ["physical_memory_bytes"]


def physical_memory_bytes() -> int | None:
    """Physical memory in bytes, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
