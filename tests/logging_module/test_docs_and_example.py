"""The guides' code runs as written, and the example shows each level's patterns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import utils_logging

SCRIPTS = Path(utils_logging.__file__).parent
GUIDES = ["LOGGING_GUIDE.md", "LOGGING_QUICK_START.md"]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _run(arguments: list[str], level: int, debug_dir: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "ANYCLAUDE_DEBUG": str(level),
        "ANYCLAUDE_DEBUG_DIR": str(debug_dir),
        "PYTHONPATH": str(SCRIPTS),
    }
    return subprocess.run(
        [sys.executable, *arguments], env=environment, capture_output=True, text=True, timeout=120, check=False
    )


class TestGuides:
    @pytest.mark.parametrize("guide", GUIDES)
    def test_code_blocks_run(self, guide: str, tmp_path: Path) -> None:
        """Every python block of a guide, run in order as one script, exits cleanly."""
        blocks = PYTHON_BLOCK.findall((SCRIPTS / guide).read_text())
        assert blocks, f"{guide} has no python blocks"
        script = tmp_path / "guide_blocks.py"
        script.write_text("\n\n".join(blocks))
        result = _run([str(script)], level=2, debug_dir=tmp_path / "debug")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr

    def test_guide_documents_every_public_name(self) -> None:
        """Each name in __all__ appears in the reference guide."""
        text = (SCRIPTS / "LOGGING_GUIDE.md").read_text()
        missing = [name for name in utils_logging.__all__ if name not in text]
        assert missing == []


class TestExample:
    @pytest.mark.parametrize("level", [0, 1, 2, 3])
    def test_runs_at_every_level(self, level: int, tmp_path: Path) -> None:
        """The example exits cleanly and shows exactly what its level promises."""
        result = _run([str(SCRIPTS / "example_logging_integration.py")], level, tmp_path / "debug")
        assert result.returncode == 0, result.stderr
        output = result.stderr
        assert "[example] INFO: Processing chat request" in output
        assert ("DEBUG:" in output) is (level >= 1)
        assert ("[Cache] HIT - prompt" in output) is (level >= 1)
        assert ("[Timer] chat_completion @ request_parsed" in output) is (level >= 2)
        assert ('Chat request {\n  "model"' in output) is (level >= 3)

    @pytest.mark.parametrize("level", [1, 3])
    def test_writes_a_real_redacted_debug_file(self, level: int, tmp_path: Path) -> None:
        """At level >= 1 a debug file is written; its planted key and cookie are redacted."""
        debug_dir = tmp_path / "debug"
        result = _run([str(SCRIPTS / "example_logging_integration.py")], level, debug_dir)
        (path,) = debug_dir.glob("anyclaude-error-500-*.json")
        assert f"Debug info written to: {path}" in result.stderr
        text = path.read_text()
        document = json.loads(text)
        assert document["request"]["headers"] == {"authorization": "[REDACTED]", "cookie": "[REDACTED]"}
        assert "sk-example" not in text and "abc123" not in text
        assert "sk-example" not in result.stderr
