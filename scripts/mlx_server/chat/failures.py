"""Unexpected failures: a redacted debug file and an ERROR line, so the details are kept but never sent."""

from __future__ import annotations

import logging
from typing import Any

from utils_logging import log_debug_error, write_error_debug_file

__all__ = ["report_failure"]

logger = logging.getLogger("mlx")


def report_failure(error: BaseException, request_info: dict[str, Any], model: str = "unknown") -> str | None:
    """Write the debug file (when ANYCLAUDE_DEBUG is on) and log the ERROR line; returns the file's path.

    See LOGGING_GUIDE.md, "Error debug files".
    """
    debug_file = write_error_debug_file(
        status_code=500,
        request_info=request_info,
        response_info={"statusCode": 500, "body": f"{type(error).__name__}: {error}"},
    )
    if debug_file:
        log_debug_error("HTTP", 500, debug_file, {"provider": "mlx", "model": model})
    logger.error("Unexpected failure: %s: %s", type(error).__name__, error, exc_info=error)
    return debug_file
