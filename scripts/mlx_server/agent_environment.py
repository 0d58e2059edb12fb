"""What an agent CLI must be told about this server's context so that it compacts before the context is full.

Claude Code (checked on 2.1.332) believes an unknown model has a window of a
million tokens, so on its own it never compacts before a local model's
context is full; the request then fails with "prompt is too long".  It reads
``CLAUDE_CODE_MAX_CONTEXT_TOKENS`` as the window and
``CLAUDE_CODE_MAX_OUTPUT_TOKENS`` as the reply's limit, and compacts once a
conversation passes ``window - min(max output, 20000) - 13000`` tokens (a
fixed 13,000-token buffer, more than a small model's whole context).  So the
window it is given is chosen for that threshold to land at ``context - 2 *
max output``, which leaves room for the summary request and its reply.
"""

from __future__ import annotations

__all__ = ["ClaudeCodeEnvironment"]

COMPACTION_BUFFER = 13_000  # Claude Code's auto-compact buffer, in tokens
OUTPUT_RESERVE_CAP = 20_000  # it reserves the reply's limit, up to this
OUTPUT_SHARE = 8  # a reply may take an eighth of the context
MAX_OUTPUT = 32_000  # Claude Code's own default limit


class ClaudeCodeEnvironment:
    """The variables to set, and the conversation length at which Claude Code will then compact."""

    def __init__(self, context_length: int) -> None:
        self.max_output = max(256, min(MAX_OUTPUT, context_length // OUTPUT_SHARE))
        self.compacts_at = context_length - 2 * self.max_output
        self.window = self.compacts_at + min(self.max_output, OUTPUT_RESERVE_CAP) + COMPACTION_BUFFER

    @property
    def variables(self) -> dict[str, str]:
        return {
            "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(self.window),
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(self.max_output),
        }

    def line(self) -> str:
        """The start-up line: the exact environment to start Claude Code with."""
        assignments = " ".join(f"{name}={value}" for name, value in self.variables.items())
        return f"Claude Code: start it with {assignments} so that it compacts at {self.compacts_at} tokens"
