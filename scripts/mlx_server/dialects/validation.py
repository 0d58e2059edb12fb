"""Checks every dialect's request models share, written once.

``Finite`` is a float that is a real number (JSON allows ``NaN`` and
``Infinity`` through Python's parser; no sampling setting means anything
then).  ``unique_tool_names`` refuses two tools of one name, which would make
a call ambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator

from mlx_server.vocabulary import UnsupportedOptionError

__all__ = ["Finite", "unique_tool_names"]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]


def unique_tool_names(names: Iterable[str], param: str = "tools") -> None:
    """UnsupportedOptionError naming every repeated tool name."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for name in names:
        (repeated if name in seen else seen).add(name)
    if repeated:
        raise UnsupportedOptionError(param, f"tool names must be unique; repeated: {', '.join(sorted(repeated))}")
