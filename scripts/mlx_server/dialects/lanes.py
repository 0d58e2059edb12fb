"""Which session a request belongs to, for the prompt cache's lanes (one per agent conversation).

Agents say it in headers: Claude Code sends ``X-Claude-Code-Session-Id`` on
every request, and ``X-Claude-Code-Agent-Id`` for a subagent's; Codex sends
``thread-id`` and ``session-id``.  OpenAI's APIs also have body fields for it
(``prompt_cache_key``, ``user``), which each dialect reads itself.  A lane
holds short digests, never the identifiers themselves: session ids are
credentials of a kind, and no log line or /v1/cache report may carry one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from mlx_server.vocabulary import Lane

__all__ = ["body_lane", "lane_key", "lane_of_headers"]

MAX_IDENTIFIER_CHARS = 512


def _digest(identifier: str) -> str:
    return hashlib.sha256(identifier[:MAX_IDENTIFIER_CHARS].encode("utf-8", "replace")).hexdigest()[:12]


def lane_key(kind: str, session: str, agent: str | None = None) -> Lane:
    """The lane of a session (and agent): 12-digit digests of the identifiers (bounded, stable, not reversible).

    A subagent's lane names its session too, so the prompt cache can tell a session's subagents from it.
    """
    return Lane(kind, _digest(session), _digest(agent) if agent else None)


def lane_of_headers(headers: Mapping[str, str]) -> Lane | None:
    """The session an agent's headers name: Claude Code's (per subagent) or Codex's thread; None if neither."""
    session = headers.get("x-claude-code-session-id")
    if session:
        return lane_key("claude-code", session, headers.get("x-claude-code-agent-id"))
    thread = headers.get("thread-id") or headers.get("session-id")
    if thread:
        return lane_key("codex", thread)
    return None


def body_lane(prompt_cache_key: str | None, user: str | None) -> Lane | None:
    """OpenAI's body fields for the same: ``prompt_cache_key`` first, then ``user``."""
    if prompt_cache_key:
        return lane_key("key", prompt_cache_key)
    if user:
        return lane_key("user", user)
    return None
