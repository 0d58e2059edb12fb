"""Server paths kept out of what clients read: a model's location is the operator's business.

A model that cannot load fails with a message a person can act on, and the
server's log keeps it whole; the client that asked for the model reads the
same sentence with each path cut to its last part (``…/model.gguf``).
"""

from __future__ import annotations

import re

__all__ = ["hide_server_paths"]

_PATH = re.compile(r"(?<![\w.:/-])(?:~/|/)[^\s'\"`,;()\[\]{}<>]*")


def hide_server_paths(message: str) -> str:
    """``message`` with every absolute or home-relative path replaced by ``…/`` and its last part."""
    return _PATH.sub(lambda match: "…/" + match.group(0).rstrip("/").rpartition("/")[2], message)
