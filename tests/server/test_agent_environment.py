"""The environment the start-up line tells Claude Code: it compacts before the server's context is full."""

from __future__ import annotations

import pytest

from mlx_server.agent_environment import ClaudeCodeEnvironment


def claude_codes_threshold(window: int, max_output: int) -> int:
    """Where Claude Code 2.1.332 starts compacting, for a window and an output limit it was given."""
    return window - min(max_output, 20_000) - 13_000


@pytest.mark.parametrize("context", [4096, 8192, 32768, 131072, 262144])
def test_claude_code_compacts_with_room_for_the_summary_and_its_reply(context: int) -> None:
    environment = ClaudeCodeEnvironment(context)
    variables = environment.variables
    window = int(variables["CLAUDE_CODE_MAX_CONTEXT_TOKENS"])
    max_output = int(variables["CLAUDE_CODE_MAX_OUTPUT_TOKENS"])
    assert claude_codes_threshold(window, max_output) == environment.compacts_at
    assert environment.compacts_at > 0 and environment.compacts_at + 2 * max_output <= context


def test_the_line_names_every_variable_with_its_value() -> None:
    line = ClaudeCodeEnvironment(8192).line()
    assert "CLAUDE_CODE_MAX_CONTEXT_TOKENS=20168 CLAUDE_CODE_MAX_OUTPUT_TOKENS=1024" in line
    assert "compacts at 6144 tokens" in line
