"""One memory budget for every loaded model: what a model takes, and which idle models go to make room.

What comes back is worth more than what was used once (the idea of ARC and
2Q, and what the prompt cache's lanes do for sessions): a model that served
one request goes before one that keeps being asked for, and within each, the
least recently used goes first.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlx_server.machine import physical_memory_bytes

__all__ = ["default_memory_budget", "describe_bytes", "victims"]

#: A model asked for this many times has come back: it is kept before ones used less.
RETURNED = 2


def default_memory_budget() -> int:
    """Three quarters of physical memory: room for every loaded model's weights and KV state, and the system."""
    physical = physical_memory_bytes() or 16 * 1024**3
    return physical * 3 // 4


def describe_bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def victims(candidates: Sequence[tuple[str, int, int, float]], needed: int) -> list[str] | None:
    """Which of the idle, unpinned ``candidates`` (name, bytes, uses, last used) to unload to free ``needed`` bytes.

    None when unloading all of them would not free enough.
    """
    chosen: list[str] = []
    freed = 0
    for name, size, _, _ in sorted(candidates, key=lambda item: (item[2] >= RETURNED, item[3])):
        if freed >= needed:
            break
        chosen.append(name)
        freed += size
    return chosen if freed >= needed else None
