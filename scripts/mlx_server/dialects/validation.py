"""Checks every dialect's request models share, written once.

``Finite`` is a float that is a real number (JSON allows ``NaN`` and
``Infinity`` through Python's parser; no sampling setting means anything
then).  ``unique_tool_names`` refuses two tools of one name, which would make
a call ambiguous.  ``most_specific`` and ``param_path`` pick, of pydantic's
errors, the one that names the field at fault (a union reports every
alternative), and write its place as a client reads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator

from mlx_server.vocabulary import UnsupportedOptionError

__all__ = ["Finite", "most_specific", "param_path", "unique_tool_names"]


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


def most_specific(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The error with the deepest location (a union's alternative that came closest), invalid JSON first."""
    invalid_json = next((error for error in errors if error.get("type") == "json_invalid"), None)
    return invalid_json or max(errors, key=lambda error: len(error.get("loc", ())))


def param_path(location: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"`` (union members' tags left out)."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and not _is_union_member_tag(str(part)):
            path += f".{part}" if path else str(part)
    return path or None


def _is_union_member_tag(part: str) -> bool:
    """pydantic names the member of a union that failed (``str``, ``list[str]``, ``function-after[...]``)."""
    return part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-")) or part[:1].isupper()


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})
