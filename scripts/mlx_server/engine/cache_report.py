"""What /v1/cache shows of a prompt cache: its entries, its sessions, and its recent decisions."""

from __future__ import annotations

from typing import Any

from mlx_server.engine.cache_lanes import session_requests
from mlx_server.engine.prompt_cache import KVPromptCache

__all__ = ["describe_entries", "describe_lanes"]


def describe_entries(cache: KVPromptCache) -> list[dict[str, Any]]:
    """Every entry, most recently used first: its kind, session, size and use."""
    _, _, now = cache.activity()
    return [
        {
            "key": entry.key.partition(":")[2][:12],
            "kind": entry.kind,
            "lane": str(entry.lane) if entry.lane is not None else None,
            "turn": entry.turn,
            "tokens": len(entry.tokens),
            "bytes": entry.nbytes,
            "pinned": entry.pinned,
            "hits": entry.hits,
            "age_seconds": round(now - entry.created, 1),
        }
        for entry in reversed(cache.entries())
    ]


def describe_lanes(cache: KVPromptCache) -> dict[str, Any]:
    """The sessions and the cache's recent decisions about them."""
    activity, decisions, now = cache.activity()
    lanes: dict[str, dict[str, Any]] = {}
    for entry in cache.entries():
        if entry.lane is None:
            continue
        lane = lanes.setdefault(str(entry.lane), {"entries": 0, "bytes": 0})
        lane["entries"] += 1
        lane["bytes"] += entry.nbytes
    sessions = session_requests(activity)
    for lane_key, seen in activity.items():
        lane = lanes.setdefault(str(lane_key), {"entries": 0, "bytes": 0})
        lane["idle_seconds"] = round(now - seen.seen, 1)
        lane["requests"] = seen.requests
        lane["session_returns"] = max(0, sessions[lane_key.session_lane] - 1)
    return {"lanes": lanes, "recent_decisions": decisions}
