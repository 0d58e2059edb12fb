"""The sampling a model's authors recommend: ``generation_config.json``, or the default model's card.

Model authors publish the settings their model wants (Qwen3: temperature
0.6, top_p 0.95, top_k 20; Qwen3-Coder: a repetition penalty of 1.05) in
``generation_config.json`` beside the weights; vLLM applies them by default
(``--generation-config auto``) and so does this server, to requests that set
none (the request wins, then the server's ``--default-*`` options, then these).
A value out of range is ignored with a warning, never trusted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_server.vocabulary import RecommendedSampling, Sampling

__all__ = ["DEFAULT_MODEL_SAMPLING", "read_generation_config"]

logger = logging.getLogger("mlx")

GENERATION_CONFIG = "generation_config.json"

#: SmolLM2-135M-Instruct's model card recommends temperature 0.2 and top_p 0.9.  A repetition penalty of 1.1
#: (measured over 12 seeds: "Hello" ends in 7-87 tokens every time; 1.2 looped once to 1,024) nearly doubles
#: the distinct words of its longer answers, which at this temperature otherwise repeat one sentence.
DEFAULT_MODEL_SAMPLING = RecommendedSampling(
    Sampling(temperature=0.2, top_p=0.9, repetition_penalty=1.1), "the SmolLM2-135M-Instruct model card"
)

_VALID: dict[str, Callable[[Any], bool]] = {
    "temperature": lambda value: 0 <= value <= 2,
    "top_p": lambda value: 0 < value <= 1,
    "top_k": lambda value: isinstance(value, int) and value >= 0,
    "min_p": lambda value: 0 <= value <= 1,
    "repetition_penalty": lambda value: 0 < value <= 10,
}


def read_generation_config(directory: Path) -> RecommendedSampling:
    """The sampling in ``directory/generation_config.json`` (nothing when the file is absent or unreadable)."""
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return RecommendedSampling()
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("%s not read: %s", path, error)
        return RecommendedSampling()
    if not isinstance(document, dict):
        return RecommendedSampling()
    values: dict[str, Any] = {}
    for name, valid in _VALID.items():
        value = document.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not valid(value):
            logger.warning("%s: %s=%r is out of range; ignored", path, name, value)
            continue
        values[name] = value if name == "top_k" else float(value)
    return RecommendedSampling(Sampling(**values), GENERATION_CONFIG) if values else RecommendedSampling()
