#!/usr/bin/env python3
"""OpenAI-compatible MLX inference server with ANYCLAUDE_DEBUG-aware logging.

    ANYCLAUDE_DEBUG=2 python3 scripts/mlx-server.py [--model PATH] [--port 8081]
    python3 scripts/mlx-server.py launch claude|codex|opencode [server options] [-- agent arguments]

The implementation lives in the ``mlx_server`` package beside this file; this
entry point parses the command line and sets up logging as
scripts/LOGGING_GUIDE.md ("Using it beside uvicorn") shows.  ``--help`` lists every
option and its MLX_SERVER_* environment variable.
"""

import logging
import os
import sys
from pathlib import Path

# Add scripts directory to path for utils_logging and mlx_server
sys.path.insert(0, str(Path(__file__).parent))

from mlx_server.settings import parse_settings
from mlx_server.startup import run
from utils_logging import display_debug_startup, setup_logger


def main() -> int:
    if sys.argv[1:2] == ["launch"]:
        from mlx_server.launch import launch

        return launch(sys.argv[2:])
    settings = parse_settings()
    logger = setup_logger("mlx", log_file=settings.log_file)
    display_debug_startup()
    return run(settings, logger)


def exit_now(code: int) -> None:
    """Exit after the server's own clean-up, skipping interpreter teardown.

    With MLX and llguidance both loaded, native thread pools torn down at
    interpreter exit sometimes abort the process ("terminate called without an
    active exception", exit -6) after everything was already saved and logged.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
